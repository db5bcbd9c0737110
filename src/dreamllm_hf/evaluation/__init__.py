"""The paper's evaluation protocols as commands (`dreamllm-hf evaluate fid|captions|vqa`), on maintained metric
libraries: torchmetrics (FID, CLIP score) and pycocoevalcap (captions); VQA accuracy as the VQA challenge defines it."""
