"""The web page (`dreamllm-hf serve`): a Gradio conversation in which DreamLLM writes and draws documents, live.

Gradio is an optional extra (`pip install 'dreamllm-hf[demo]'`); only `serve.app` imports it (and the `serve`
command, when it runs).
"""
