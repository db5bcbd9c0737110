"""The behaviours transformers and diffusers hold their own models and pipelines to, as mixins of our own.

Neither library ships its test mixins (`ModelTesterMixin`, `GenerationTesterMixin`, `PipelineTesterMixin`) in its
wheel, so this is a small layer shaped like them: a test class names its component factory and its inputs, and
inherits every check. `ModelContract` runs against a model config (`get_config`); `PipelineContract` against a
pipeline class, the other pipeline that shares its components (`from_pipe`), the components (`get_dummy_components`)
and one call's arguments (`get_dummy_inputs`). The tests that bind them live in `test_contracts.py`.
"""

import inspect
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import BaseOutput
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    CompileConfig,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

import dreamllm_hf  # noqa: F401  (registers the Auto classes)
from dreamllm_hf import DreamLLMConfig, DreamLLMModel
from dreamllm_hf import constants as C
from dreamllm_hf.modeling import DreamEmbeddingsOutput, DreamLLMProcessor
from dreamllm_hf.shapes_world.demo_model_path import DEMO_MODEL_PATH
from dreamllm_hf.testing_utils import tiny_config, tiny_model, tiny_pipeline_components, tiny_processor


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def assert_same_output(actual, expected, atol: float = 0.0, path: str = "output") -> None:
    """Equal structure and values: outputs, tuples, lists, dicts, arrays, tensors, pictures and plain values."""
    if isinstance(expected, BaseOutput):
        assert isinstance(actual, type(expected)), f"{path}: {type(actual).__name__} is not {type(expected).__name__}"
        assert list(actual.keys()) == list(expected.keys()), f"{path}: fields {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same_output(actual[key], expected[key], atol, f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{path}: lengths differ"
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same_output(a, e, atol, f"{path}[{index}]")
    elif isinstance(expected, (np.ndarray, torch.Tensor, PIL.Image.Image)):
        a, e = (np.asarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x) for x in (actual, expected))
        assert a.shape == e.shape, f"{path}: shape {a.shape} != {e.shape}"
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), atol=atol, rtol=0, err_msg=path)
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def differs(actual, expected) -> bool:
    try:
        assert_same_output(actual, expected, atol=1e-6)
    except AssertionError:
        return True
    return False


# ----------------------------------------------------------------------------------------------------------------------
# The model


class ModelContract:
    """
    Shaped like transformers' `ModelTesterMixin` and `GenerationTesterMixin`, for [`DreamLLMForConditionalGeneration`]
    built from `get_config()` (a tiny config by default; another backbone overrides it).
    """

    auto_classes = (AutoModelForCausalLM, AutoModelForImageTextToText)
    atol = 1e-5  # fp32 rounding between a batch and its rows

    @classmethod
    def get_config(cls) -> DreamLLMConfig:
        return tiny_config()

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls):
        return tiny_model(cls.get_config())

    # Token streams in the model's own layout (the model knows no processor).
    @staticmethod
    def image_block(config) -> list[int]:
        return [config.image_start_token_id, *[config.image_patch_token_id] * config.num_image_tokens] + [
            config.image_end_token_id
        ]

    @staticmethod
    def dream_block(config) -> list[int]:
        return [config.dream_start_token_id, *[config.image_patch_token_id] * config.num_dream_queries] + [
            config.dream_end_token_id
        ]

    @staticmethod
    def pixels(config, count: int, seed: int = 0) -> torch.Tensor:
        size = config.vision_config.image_size
        return torch.randn(count, 3, size, size, generator=seeded(seed))

    def prompt(self, config, words: list[int]) -> list[int]:
        """BOS, `words`, a picture to read, two more words: what a prompt about a picture looks like."""
        return [config.bos_token_id, *words, *self.image_block(config), 7, 8]

    # -- ModelTesterMixin ---------------------------------------------------------------------------------------------

    def test_save_load_round_trip_through_the_auto_classes(self, model, tmp_path):
        config = model.config
        model.save_pretrained(tmp_path)
        assert isinstance(AutoConfig.from_pretrained(tmp_path), DreamLLMConfig)
        ids = torch.tensor([self.prompt(config, [5, 6])])
        with torch.no_grad():
            expected = model(input_ids=ids, pixel_values=self.pixels(config, 1)).logits
            for auto_class in self.auto_classes:
                loaded = auto_class.from_pretrained(tmp_path).eval()
                assert type(loaded) is type(model)
                torch.testing.assert_close(loaded(input_ids=ids, pixel_values=self.pixels(config, 1)).logits, expected)
        backbone = AutoModel.from_pretrained(tmp_path)
        assert type(backbone) is DreamLLMModel
        torch.testing.assert_close(backbone.dream_queries.weight, model.model.dream_queries.weight)

    @pytest.mark.parametrize("head", [True, False], ids=["for_conditional_generation", "model"])
    def test_dict_and_tuple_outputs_are_equal(self, model, head):
        """`return_dict=False` returns the output's fields as a tuple (`to_tuple()`), for the head and the backbone."""
        config = model.config
        ids = torch.tensor([[config.bos_token_id, 5, *self.dream_block(config), *self.image_block(config), 6]])
        kwargs = dict(input_ids=ids, pixel_values=self.pixels(config, 1), use_cache=False)
        if head:
            module, kwargs["labels"] = model, ids
        else:
            module = model.model
        with torch.no_grad():
            as_dict = module(**kwargs)
            as_tuple = module(**kwargs, return_dict=False)
        assert isinstance(as_tuple, tuple)
        assert_same_output(as_tuple, as_dict.to_tuple())

    def test_batch_equals_each_row_alone(self, model):
        """Rows of one batch (each with a picture read and a dream block) give what each gives alone."""
        config = model.config
        rows = [
            [config.bos_token_id, 5, 6, *self.dream_block(config), *self.image_block(config), 9],
            [config.bos_token_id, 10, 11, *self.dream_block(config), *self.image_block(config), 12],
        ]
        pixels = self.pixels(config, 2, seed=3)
        with torch.no_grad():
            batch = model(input_ids=torch.tensor(rows), pixel_values=pixels)
            for index, row in enumerate(rows):
                alone = model(input_ids=torch.tensor([row]), pixel_values=pixels[index : index + 1])
                torch.testing.assert_close(batch.logits[index], alone.logits[0], atol=self.atol, rtol=self.atol)
                torch.testing.assert_close(
                    batch.dream_embeddings[index], alone.dream_embeddings[0], atol=self.atol, rtol=self.atol
                )

    # -- The model's API in transformers 5 shape (issue 24) -----------------------------------------------------------

    def test_inputs_embeds_with_pixel_values_equal_input_ids(self, model):
        """Embeddings of the ids plus the pictures give what the ids give (Llava's `get_placeholder_mask` way of
        finding the image slots), in `forward` and in `generate`."""
        config = model.config
        ids = torch.tensor([[config.bos_token_id, 5, *self.dream_block(config), *self.image_block(config), 6, 7]])
        pixels = self.pixels(config, 1)
        embeds = model.get_input_embeddings()(ids)
        with torch.no_grad():
            from_ids = model(input_ids=ids, pixel_values=pixels)
            from_embeds = model(inputs_embeds=embeds, pixel_values=pixels)
        torch.testing.assert_close(from_embeds.logits, from_ids.logits)
        torch.testing.assert_close(from_embeds.dream_embeddings, from_ids.dream_embeddings)
        # Without the picture the image block is refused, as for ids: it would be read unfilled.
        with pytest.raises(ValueError, match="image block"):
            model(inputs_embeds=embeds)
        generated = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
        from_embeddings = model.generate(inputs_embeds=embeds, pixel_values=pixels, max_new_tokens=4, do_sample=False)
        assert torch.equal(from_embeddings, generated[:, ids.shape[1] :])  # generate returns the new tokens only

    def test_get_image_features_returns_the_tower_output_with_projected_features(self, model):
        config = model.config
        pixels = self.pixels(config, 2)
        calls = []
        hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
        try:
            with torch.no_grad():
                output = model.get_image_features(pixels)
        finally:
            hook.remove()
        assert calls == [1]  # the tower's own forward, not its inner modules driven by hand
        assert isinstance(output, BaseModelOutputWithPooling)
        hidden = config.text_config.hidden_size
        assert output.pooler_output.shape == (2, config.num_image_tokens, hidden)
        eager = tiny_model(self.get_config())  # sdpa attention returns no weights
        eager.set_attn_implementation("eager")
        with torch.no_grad():
            everything = eager.get_image_features(pixels, output_hidden_states=True, output_attentions=True)
            as_tuple = model.get_image_features(pixels, return_dict=False)
        layers = config.vision_config.num_hidden_layers
        assert len(everything.hidden_states) == layers + 1 and all(h is not None for h in everything.hidden_states)
        assert len(everything.attentions) == layers
        torch.testing.assert_close(everything.pooler_output, output.pooler_output)
        patches = everything.hidden_states[config.vision_feature_layer][:, -config.num_image_tokens :]
        with torch.no_grad():
            torch.testing.assert_close(output.pooler_output, model.model.multi_modal_projector(patches))
        assert isinstance(as_tuple, tuple)
        assert_same_output(as_tuple, output.to_tuple())
        # Hidden states picked by index (transformers 5) are kept beside the one the projector reads.
        with torch.no_grad():
            picked = model.get_image_features(pixels, output_hidden_states=[0])
            ids = torch.tensor([self.prompt(config, [5])])
            forward = model(input_ids=ids, pixel_values=pixels[:1], output_hidden_states=[1])
        kept = [index for index, state in enumerate(picked.hidden_states) if state is not None]
        assert kept == sorted({0, config.vision_feature_layer % (layers + 1)})
        torch.testing.assert_close(picked.pooler_output, output.pooler_output)
        assert forward.hidden_states[1] is not None

    def test_the_configs_output_hidden_states_reaches_the_vision_tower(self):
        """`output_hidden_states=True` said by the DreamLLM config alone (as `from_pretrained(..., output_hidden_states=
        True)` sets it) reaches the tower, whose own config says nothing: every hidden state comes back, the one the
        projector reads among them (it was dropped, and the forward failed on it)."""
        config = self.get_config()
        config.output_hidden_states = True
        model = tiny_model(config)
        ids = torch.tensor([self.prompt(config, [5])])
        with torch.no_grad():
            tower = model(input_ids=ids, pixel_values=self.pixels(config, 1)).image_outputs
        layers = config.vision_config.num_hidden_layers
        assert len(tower.hidden_states) == layers + 1 and all(h is not None for h in tower.hidden_states)

    def test_weights_missing_from_a_checkpoint_get_their_backbones_init(self, model):
        """Weights a checkpoint lacks are initialized as their backbone initializes them: CLIP sets the spread of its
        attention and MLP layers from the parent module, which was skipped (they kept a bare Linear's 0.02)."""
        config = model.config
        loaded = type(model).from_pretrained(None, config=config, state_dict={})
        reference = AutoModel.from_config(config.vision_config)
        expected = {name: p.std() for name, p in reference.named_parameters() if p.ndim >= 2}
        spreads = {name: p.std() for name, p in loaded.model.vision_tower.named_parameters() if name in expected}
        assert spreads.keys() == expected.keys()
        off = {name: (float(spreads[name]), float(std)) for name, std in expected.items()}
        assert all(0.7 < got / want < 1.4 for got, want in off.values()), off

    def test_get_dream_embeddings_returns_one_output(self, model):
        config = model.config
        with torch.no_grad():
            dream = model.get_dream_embeddings(torch.tensor([[config.bos_token_id, 5, 6]]))
        assert isinstance(dream, DreamEmbeddingsOutput)
        queries = config.num_dream_queries
        assert dream.dream_embeddings.shape == (1, queries, config.cross_attention_dim)
        assert dream.dream_hidden_states.shape == (1, queries, config.text_config.hidden_size)
        assert (dream.dream_pooled_embeddings is None) == (config.pooled_projection_dim is None)

    @pytest.mark.parametrize("pooled_projection_dim", [None, 6], ids=["sd", "sdxl"])
    def test_keep_in_fp32_modules_exist(self, pooled_projection_dim):
        config = self.get_config()
        config.pooled_projection_dim = pooled_projection_dim
        model = tiny_model(config)
        names = {name.split(".")[-1] for name, _ in model.named_modules()}
        assert model._keep_in_fp32_modules and set(model._keep_in_fp32_modules) <= names
        assert ("pooled_projector" in model._keep_in_fp32_modules) == (pooled_projection_dim is not None)

    def test_the_loss_is_the_loss_function(self, model):
        """The head's loss is `self.loss_function`'s: `shift_labels` replace the shifted labels, `num_items_in_batch`
        divides the sum; and a batch without targets has loss 0, not NaN."""
        config = model.config
        ids = torch.tensor([[config.bos_token_id, 5, 6, 7, 8, 9], [config.bos_token_id, 10, 11, 12, 13, 14]])
        labels = ids.clone()
        labels[0, :3] = -100
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
            vocab = config.text_config.vocab_size
            expected = model.loss_function(logits=out.logits, labels=labels, vocab_size=vocab)
            torch.testing.assert_close(out.loss, expected)
            shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            torch.testing.assert_close(model(input_ids=ids, shift_labels=shifted).loss, out.loss)
            targets = int((labels[:, 1:] != -100).sum())
            summed = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(1)).loss
            torch.testing.assert_close(summed, out.loss * targets)
            nothing = model(input_ids=ids, labels=torch.full_like(ids, -100)).loss
        assert torch.isfinite(nothing) and nothing.item() == 0.0

    # -- GenerationTesterMixin ----------------------------------------------------------------------------------------

    def test_generate_uses_the_cache_and_reads_pictures_once(self, model):
        config = model.config
        ids = torch.tensor([self.prompt(config, [5])])
        calls = []
        hook = model.model.vision_tower.embeddings.register_forward_hook(lambda *args: calls.append(1))
        try:
            cached = model.generate(
                input_ids=ids, pixel_values=self.pixels(config, 1), max_new_tokens=6, do_sample=False
            )
        finally:
            hook.remove()
        assert len(calls) == 1  # the original ran a dummy CLIP pass at every decode step
        uncached = model.generate(
            input_ids=ids, pixel_values=self.pixels(config, 1), max_new_tokens=6, do_sample=False, use_cache=False
        )
        assert torch.equal(cached, uncached)

    def test_assisted_decoding_of_a_prompt_with_a_picture_matches_greedy(self, model):
        """`generate` gives the pictures to its first forward only, never to an assistant model, whose own cache
        starts empty all the same: the assistant's first forward must get them too (it was refused)."""
        config = model.config
        ids = torch.tensor([self.prompt(config, [5, 6])])
        kwargs = dict(input_ids=ids, pixel_values=self.pixels(config, 1), max_new_tokens=6, do_sample=False)
        greedy = model.generate(**kwargs)
        assisted = model.generate(**kwargs, assistant_model=model)
        assert torch.equal(assisted, greedy)

    def test_left_padded_batch_generates_as_each_row_alone(self, model):
        config = model.config
        prompts = [self.prompt(config, [5, 6, 7, 8, 9]), self.prompt(config, [10])]
        images = self.pixels(config, 2)
        singles = [
            model.generate(
                input_ids=torch.tensor([p]), pixel_values=images[i : i + 1], max_new_tokens=5, do_sample=False
            )[0, len(p) :]
            for i, p in enumerate(prompts)
        ]
        width = max(map(len, prompts))
        pad = config.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        batched = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=images,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=pad,
        )
        for row, single in zip(batched[:, width:], singles):
            assert torch.equal(row, single)

    def test_static_cache_decode_compiles_as_one_graph(self, model):
        """What `generate(cache_implementation="static")` does on a GPU: compile the decode step. A graph break (e.g.
        from reading the static cache's on-device length) would cost a sync per token and the CUDA graph."""
        config = model.config
        ids = torch.tensor([self.prompt(config, [5])])
        expected = model.generate(
            input_ids=ids, pixel_values=self.pixels(config, 1), max_new_tokens=6, do_sample=False
        )
        compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = model.generate(
            input_ids=ids,
            pixel_values=self.pixels(config, 1),
            max_new_tokens=6,
            do_sample=False,
            cache_implementation="static",
            compile_config=compile_config,
        )
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        assert torch.equal(compiled, expected)


# ----------------------------------------------------------------------------------------------------------------------
# The pipelines


class PipelineContract:
    """
    Shaped like diffusers' `PipelineTesterMixin`. A test class sets `pipeline_class`, `other_pipeline_class` (the
    pipeline `from_pipe` makes from this one), `get_dummy_inputs(pipe, seed)` (one call: a prompt, a `generator`,
    2 steps, `output_type="np"`) and `items(output)` (one comparable entry per picture or document).
    """

    pipeline_class = None
    other_pipeline_class = None
    batch_prompts = ("a red circle", "Tell me a story about a small blue square and a green triangle.")
    negative_prompts = ("blurry", "dark and noisy")
    atol = 1e-5  # fp32 rounding between a batch and its rows, on pictures in [0, 1]

    @classmethod
    def get_dummy_components(cls) -> dict:
        return tiny_pipeline_components()

    def get_dummy_inputs(self, pipe, seed: int = 0) -> dict:
        raise NotImplementedError

    def items(self, output) -> list:
        raise NotImplementedError

    @classmethod
    def make(cls):
        pipe = cls.pipeline_class(**cls.get_dummy_components())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @pytest.fixture(scope="class")
    @classmethod
    def pipe(cls):
        """One pipeline for the checks that leave it as they found it."""
        return cls.make()

    @pytest.fixture
    def fresh_pipe(self):
        """A pipeline of its own, for the checks that add offload hooks or change a dtype."""
        return self.make()

    def test_save_load_round_trip(self, pipe, tmp_path):
        expected = pipe(**self.get_dummy_inputs(pipe))
        pipe.save_pretrained(tmp_path)
        index = json.loads((tmp_path / "model_index.json").read_text())
        assert index["_class_name"] == self.pipeline_class.__name__
        assert index["mllm"] == ["dreamllm_hf.modeling.modeling_dreamllm", "DreamLLMForConditionalGeneration"]
        assert index["processor"] == ["dreamllm_hf.modeling.processing_dreamllm", "DreamLLMProcessor"]
        assert index["scheduler"] == ["diffusers", type(pipe.scheduler).__name__]
        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert_same_output(loaded(**self.get_dummy_inputs(loaded)), expected)
        # The other pipeline loads from the same folder and gives what `from_pipe` gives.
        other = self.other_pipeline_class.from_pretrained(tmp_path)
        assert isinstance(other, self.other_pipeline_class)
        assert_same_output(
            self.pipeline_class.from_pipe(other)(**self.get_dummy_inputs(loaded)), expected
        )  # the round trip through the other class changes nothing

    def test_dict_and_tuple_outputs_are_equal(self, pipe):
        as_dict = pipe(**self.get_dummy_inputs(pipe))
        as_tuple = pipe(**self.get_dummy_inputs(pipe), return_dict=False)
        assert isinstance(as_tuple, tuple)
        assert_same_output(as_tuple, as_dict.to_tuple())

    @pytest.mark.parametrize("with_negative_prompts", [False, True])
    def test_batch_equals_each_prompt_alone(self, pipe, with_negative_prompts):
        """Prompts of different lengths (left-padded in one batch), one generator each: the same as one by one."""
        inputs = self.get_dummy_inputs(pipe)
        prompts, negatives = list(self.batch_prompts), list(self.negative_prompts)
        if with_negative_prompts:
            inputs["negative_prompt"] = negatives
        inputs.update(prompt=prompts, generator=[seeded(1), seeded(2)])
        batch = self.items(pipe(**inputs))
        assert len(batch) == len(prompts)
        for index, prompt in enumerate(prompts):
            inputs.update(prompt=prompt, generator=[seeded(index + 1)])
            if with_negative_prompts:
                inputs["negative_prompt"] = negatives[index]
            assert_same_output(batch[index], self.items(pipe(**inputs))[0], atol=self.atol)

    def test_num_images_per_prompt(self, pipe):
        inputs = self.get_dummy_inputs(pipe)
        inputs.update(prompt=list(self.batch_prompts), num_images_per_prompt=2)
        inputs["generator"] = [seeded(i) for i in range(4)]
        items = self.items(pipe(**inputs))
        assert len(items) == 4
        assert differs(items[0], items[1]) and differs(items[2], items[3])  # each copy has its own generator
        inputs["generator"] = [seeded(0)]
        with pytest.raises(ValueError, match="generators"):
            pipe(**inputs)

    def test_callback_on_step_end_gets_its_tensor_inputs_and_can_change_latents(self, pipe):
        names = list(self.pipeline_class._callback_tensor_inputs)
        seen = []

        def zero_at_last_step(pipeline, step, timestep, callback_kwargs):
            seen.append((step, {k: type(v) for k, v in callback_kwargs.items()}))
            if step == pipeline.num_timesteps - 1:
                return {"latents": torch.zeros_like(callback_kwargs["latents"])}
            return {}

        outputs = []
        for seed in (0, 1):
            inputs = self.get_dummy_inputs(pipe, seed)
            outputs.append(
                pipe(**inputs, callback_on_step_end=zero_at_last_step, callback_on_step_end_tensor_inputs=names)
            )
        assert [step for step, _ in seen] == [0, 1, 0, 1]
        assert all(kinds == dict.fromkeys(names, torch.Tensor) for _, kinds in seen)
        # The pictures are decoded from zero latents: the seed no longer shows, and they differ from a plain call.
        assert_same_output(self.items(outputs[1]), self.items(outputs[0]))
        assert differs(self.items(pipe(**self.get_dummy_inputs(pipe, 0))), self.items(outputs[0]))

    def test_callback_gets_the_called_pipeline_whose_guidance_and_interrupt_steer_the_loop(self, pipe):
        seen = []

        def raise_guidance(pipeline, step, timestep, callback_kwargs):
            seen.append((pipeline, step, pipeline.guidance_scale))
            pipeline._guidance_scale += 1.0
            return {}

        inputs = self.get_dummy_inputs(pipe)
        start = inputs.get("guidance_scale", 7.5)
        steered = pipe(**inputs, callback_on_step_end=raise_guidance)
        assert seen and all(called is pipe for called, _, _ in seen)
        assert [g for _, _, g in seen] == [start + step for _, step, _ in seen]  # each step saw the last one's change
        assert differs(self.items(steered), self.items(pipe(**self.get_dummy_inputs(pipe))))

        seen.clear()

        def stop(pipeline, step, timestep, callback_kwargs):
            seen.append((pipeline, step, None))
            pipeline._interrupt = True
            return {}

        pipe(**self.get_dummy_inputs(pipe), callback_on_step_end=stop)
        assert seen and all(step == 0 for _, step, _ in seen)  # every loop left after its first step

    def test_model_cpu_offload_runs_twice(self, fresh_pipe):
        pipe = fresh_pipe
        expected = pipe(**self.get_dummy_inputs(pipe))
        if not torch.cuda.is_available():  # diffusers 0.42 wants an accelerator unless the device is named
            with pytest.raises(RuntimeError, match="requires accelerator"):
                pipe.enable_model_cpu_offload()
        pipe.enable_model_cpu_offload(device="cpu")
        assert pipe._execution_device.type == "cpu" and pipe._all_hooks  # offload hooks are in place
        for _ in range(2):  # the hooks put every model back where it was after a call
            assert_same_output(pipe(**self.get_dummy_inputs(pipe)), expected)

    def test_from_pipe_shares_components_and_keeps_dtypes(self, fresh_pipe):
        pipe = fresh_pipe
        expected = pipe(**self.get_dummy_inputs(pipe))
        other = self.other_pipeline_class.from_pipe(pipe)
        assert isinstance(other, self.other_pipeline_class)
        for name in pipe.components:
            assert getattr(other, name) is getattr(pipe, name), name
        back = self.pipeline_class.from_pipe(other)
        assert_same_output(back(**self.get_dummy_inputs(back)), expected)
        replaced = self.other_pipeline_class.from_pipe(
            pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        )
        assert isinstance(replaced.scheduler, EulerDiscreteScheduler) and replaced.mllm is pipe.mllm
        with pytest.raises(TypeError, match="unexpected keyword"):
            self.other_pipeline_class.from_pipe(pipe, text_encoder=None)
        pipe.unet.to(torch.float16)
        half = self.other_pipeline_class.from_pipe(pipe)
        assert half.unet is pipe.unet and half.unet.dtype == torch.float16  # diffusers' default would cast to fp32


class Text2ImagePipelineContract(PipelineContract):
    """What diffusers holds a Stable Diffusion text-to-image pipeline to besides: drawing from precomputed embeddings
    with the text encoder (here the mllm and its processor) set to `None`, and `StableDiffusionMixin`."""

    def test_encode_prompt_works_in_isolation(self, pipe):
        inputs = self.get_dummy_inputs(pipe)
        expected = pipe(**inputs)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            inputs.pop("prompt"), torch.device("cpu"), 1, inputs["guidance_scale"] > 1
        )
        bare = self.pipeline_class(**{**pipe.components, "mllm": None, "processor": None})
        bare.set_progress_bar_config(disable=True)
        inputs["generator"] = seeded(0)
        drawn = bare(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            **inputs,
        )
        assert_same_output(drawn, expected)
        with pytest.raises(ValueError, match="no mllm and processor"):
            bare(**self.get_dummy_inputs(pipe))

    def test_stable_diffusion_mixin(self, fresh_pipe):
        pipe = fresh_pipe
        assert isinstance(pipe, StableDiffusionMixin)
        expected = self.items(pipe(**self.get_dummy_inputs(pipe)))
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        assert differs(self.items(pipe(**self.get_dummy_inputs(pipe))), expected)
        pipe.disable_freeu()
        assert_same_output(self.items(pipe(**self.get_dummy_inputs(pipe))), expected)
        pipe.fuse_qkv_projections()
        assert_same_output(self.items(pipe(**self.get_dummy_inputs(pipe))), expected, atol=self.atol)
        pipe.unfuse_qkv_projections()
        assert_same_output(self.items(pipe(**self.get_dummy_inputs(pipe))), expected)


# ----------------------------------------------------------------------------------------------------------------------
# The processor


def random_picture(height: int = 40, width: int = 40, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def chat_template_with_generation_marks(template: str) -> str:
    """The Vicuna template with the assistant's turns in `{% generation %}` marks, as `return_assistant_tokens_mask`
    reads them (the shipped template has none: training builds its own targets)."""
    turn = "{{ 'ASSISTANT:' + ('' if text.startswith('<dream>') else ' ') + text + '</s>' }}"
    marked = (
        "{{ 'ASSISTANT:' }}{% generation %}{{ ('' if text.startswith('<dream>') else ' ') + text + '</s>' }}"
        "{% endgeneration %}"
    )
    assert turn in template
    return template.replace(turn, marked)


class ProcessorContract:
    """Shaped like transformers' `ProcessorTesterMixin`, for [`DreamLLMProcessor`] from `get_processor()`."""

    @classmethod
    def get_processor(cls) -> DreamLLMProcessor:
        return tiny_processor()

    @pytest.fixture(scope="class")
    @classmethod
    def processor(cls):
        return cls.get_processor()

    def test_image_token_and_its_id(self, processor):
        assert processor.image_token == C.IMAGE_PLACEHOLDER
        assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def test_call_arguments_default_to_none(self, processor):
        parameters = inspect.signature(type(processor).__call__).parameters.values()
        explicit = [p for p in parameters if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
        assert [p.name for p in explicit] == ["images", "text"] and all(p.default is None for p in explicit)

    def test_call_arguments_are_typed(self, processor):
        """transformers' `ProcessorTesterMixin` finds a processor's inputs by their annotations: an untyped `images`
        made it skip its test of a batch mixing prompts with and without pictures."""
        parameters = inspect.signature(type(processor).__call__).parameters
        assert all(parameters[name].annotation is not inspect.Parameter.empty for name in ("images", "text"))

    def test_image_processor_kwargs_reach_the_image_processor(self, processor):
        picture = random_picture()
        default = processor(text="<image>", images=picture, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(default, processor.image_processor(picture, return_tensors="pt")["pixel_values"])
        expected = processor.image_processor(picture, do_rescale=False, return_tensors="pt")["pixel_values"]
        assert differs(expected, default)
        for kwargs in ({"do_rescale": False}, {"images_kwargs": {"do_rescale": False}}):
            given = processor(text="<image>", images=picture, return_tensors="pt", **kwargs)["pixel_values"]
            torch.testing.assert_close(given, expected)

    def test_the_tokenizers_saved_defaults_are_kept(self, processor, tmp_path):
        prompts = ["a red circle and a blue square", "a dot"]

        def padded_on(processor, **kwargs) -> str:
            mask = processor(text=prompts, return_tensors="pt", **kwargs)["attention_mask"][1]
            return "left" if mask[0] == 0 else "right" if mask[-1] == 0 else "nowhere"

        assert padded_on(processor) == "left"  # the processor's own default: generation continues on the right
        processor.tokenizer.save_pretrained(tmp_path)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path, padding_side="right")
        saved = type(processor)(
            processor.image_processor, tokenizer, processor.num_image_tokens, processor.num_dream_queries
        )
        assert padded_on(saved) == "right"
        assert padded_on(saved, padding_side="left") == "left"  # what the call says comes first

    def test_offsets_and_the_assistant_tokens_mask(self, processor):
        text = "USER: <image> what is it? ASSISTANT: a red circle"
        encoded = processor(text=text, images=random_picture(), return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"][0], encoded["offset_mapping"][0]
        assert len(offsets) == len(ids)
        block = set(processor.image_block_ids)
        assert {text[start:end].strip() for token, (start, end) in zip(ids, offsets) if token in block} == {"<image>"}
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
        ]
        out = processor.apply_chat_template(
            messages,
            chat_template=chat_template_with_generation_marks(processor.chat_template),
            images=[random_picture()],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = out["input_ids"][0], out["assistant_masks"][0]
        assert len(mask) == len(ids) and 0 < sum(mask) < len(ids)
        answer = processor.tokenizer.decode([token for token, kept in zip(ids, mask) if kept])
        assert answer.strip() == "a red circle" + processor.tokenizer.eos_token

    def test_num_multimodal_tokens_are_the_image_slots(self, processor):
        sizes = [[30, 40], [64, 20]]
        counts = processor._get_num_multimodal_tokens(image_sizes=sizes)
        assert counts.num_image_tokens == [processor.num_image_tokens] * 2
        pictures = [random_picture(h, w, seed) for seed, (h, w) in enumerate(sizes)]
        out = processor(text="<image> and <dream>", images=pictures, return_mm_token_type_ids=True)
        assert sum(out["mm_token_type_ids"][0]) == sum(counts.num_image_tokens)

    @pytest.mark.parametrize("shipped", [False, True], ids=["default", "demo_model"])
    def test_the_chat_template_takes_system_content_as_text_parts(self, processor, shipped):
        template = (DEMO_MODEL_PATH / "processor" / "chat_template.jinja").read_text() if shipped else None
        as_string = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
        as_parts = [
            {"role": "system", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": " brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
        rendered = [
            processor.apply_chat_template(messages, chat_template=template, tokenize=False)
            for messages in (as_string, as_parts)
        ]
        assert rendered[0] == rendered[1] and rendered[0].startswith("Be brief. USER: hi")
