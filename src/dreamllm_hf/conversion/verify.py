"""Check a converted DreamLLM against an independent reading of the original release's tensors.

Two kinds of checks:

* **Weights**: every tensor of every safetensors file is compared with the release tensor it comes from (cast to the
  converted dtype); they must be equal bit for bit, and no tensor may be missing or extra. One tensor at a time.
* **Outputs**, on fixed random inputs (seeded), of the converted models loaded the way users load them
  (`DreamLLMForConditionalGeneration.from_pretrained`, diffusers `from_pretrained`) against a reference built from the
  release's state dicts with stock classes and the release's own key names, not through this package's key map or
  modeling code: `LlamaForCausalLM` (the keys of `pytorch_model.bin` as they are), `CLIPVisionModel` (the CLIP keys of
  `clip_vision_embedding.bin`), and the two linear projectors and the dream queries as plain tensors:

  - image features: CLIP hidden state `select_layer`, CLS dropped, through the image projector;
  - logits of a sequence BOS + text + `<im_start>` + image slots + `<im_end>` + text, with the features written into the
    slots after `<im_start>` (as the original does);
  - dream conditioning: final-norm hidden states at the query slots of `[<dream_start>, queries, <dream_end>]`
    appended to a caption, through the condition projector (the UNet's `encoder_hidden_states`);
  - one UNet noise prediction on that conditioning; a VAE decode and a VAE encode (posterior mean).

The models are loaded one at a time (reference, then converted), so the verification holds one copy of a model in
`compute_dtype` at a time.
"""

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from .. import constants as C
from ..decoder_conditioning import vae_scale_factor
from ..modeling.configuration_dreamllm import CLIP_VIT_L_14_VISION_CONFIG
from . import checkpoint_io as io
from . import original_layout as L


# (atol, rtol) per compute dtype: a check passes when max|converted - reference| <= atol + rtol * max|reference|.
DEFAULT_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 1e-2), torch.bfloat16: (1e-2, 2e-2)}
CLIP_PREFIX = "clip_vision_model.vision_model."


@dataclass
class ParityCheck:
    name: str
    shape: list[int]
    max_abs_diff: float
    reference_max_abs: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance


@dataclass
class VerificationReport:
    checks: list[ParityCheck] = field(default_factory=list)
    weights_compared: int = 0
    weights_max_abs_diff: float = 0.0
    weights_mismatched: list[str] = field(default_factory=list)
    compute_dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    seconds: float = 0.0

    @property
    def weights_passed(self) -> bool:
        return not self.weights_mismatched

    @property
    def passed(self) -> bool:
        return self.weights_passed and all(check.passed for check in self.checks)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        for check, item in zip(self.checks, out["checks"]):
            item["passed"] = check.passed
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "VerificationReport":
        data = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        checks = [
            ParityCheck(**{k: v for k, v in c.items() if k in ParityCheck.__dataclass_fields__})
            for c in data.pop("checks", [])
        ]
        return cls(checks=checks, **data)

    def rows(self) -> list[list[str]]:
        weights = (
            f"{self.weights_compared} tensors bit-identical"
            if self.weights_passed
            else f"{len(self.weights_mismatched)} of {self.weights_compared} differ: "
            + ", ".join(self.weights_mismatched[:3])
        )
        rows = [
            [
                "all weights vs the release's tensors",
                "-",
                f"{self.weights_max_abs_diff:.3g}",
                "-",
                "0",
                weights,
                "pass" if self.weights_passed else "FAIL",
            ]
        ]
        for check in self.checks:
            rows.append(
                [
                    check.name,
                    "x".join(map(str, check.shape)),
                    f"{check.max_abs_diff:.3g}",
                    f"{check.reference_max_abs:.3g}",
                    f"{check.tolerance:.3g}",
                    "",
                    "pass" if check.passed else "FAIL",
                ]
            )
        return rows

    def to_markdown(self) -> str:
        header = (
            "| check | shape | max abs diff | max abs reference | tolerance | note | result |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        return header + "".join("| " + " | ".join(row) + " |\n" for row in self.rows())

    def format_table(self) -> str:
        rows = [["check", "shape", "max|diff|", "max|ref|", "tol", "note", "result"], *self.rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        verdict = "PASSED" if self.passed else "FAILED"
        return "\n".join(lines) + (
            f"\nverification {verdict} ({self.compute_dtype} on {self.device}, seed {self.seed}, {self.seconds:.1f} s)"
        )


class VerificationError(RuntimeError):
    """The converted checkpoint does not reproduce the original within tolerance."""

    def __init__(self, report: VerificationReport):
        self.report = report
        super().__init__("The converted checkpoint does not match the original release:\n" + report.format_table())


# ----------------------------------------------------------------------------------------------------------------------


def _max_abs(tensor: torch.Tensor) -> float:
    return tensor.detach().float().abs().max().item() if tensor.numel() else 0.0


def _compare(name, converted, reference, atol, rtol) -> ParityCheck:
    if tuple(converted.shape) != tuple(reference.shape):
        return ParityCheck(name, list(converted.shape), float("inf"), _max_abs(reference), 0.0)
    diff = _max_abs(converted.float() - reference.float())
    scale = _max_abs(reference)
    return ParityCheck(name, list(reference.shape), diff, scale, atol + rtol * scale)


def _record(report: VerificationReport, component: str, references: dict, run, atol: float, rtol: float) -> None:
    """Runs the converted side; a converted model that cannot even be loaded or run fails its checks (no exception)."""
    try:
        outputs = run()
    except Exception as error:  # noqa: BLE001 - any failure of the converted side is a failed verification
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__
        for name, reference in references.items():
            report.checks.append(
                ParityCheck(
                    f"{name} [converted {component} failed: {reason}]",
                    list(reference.shape),
                    float("inf"),
                    _max_abs(reference),
                    0.0,
                )
            )
        return
    for (name, reference), output in zip(references.items(), outputs):
        report.checks.append(_compare(name, output, reference, atol, rtol))


def _check_weights(
    converted_dir: Path, release: L.ReleaseTensors, dtype, report: VerificationReport, releaser: io.PageReleaser
) -> None:
    max_diff = 0.0
    for component, expected in release.components.items():
        seen = set()
        for path in io.iter_safetensors(converted_dir / component):
            with safe_open(path, framework="pt") as file:
                for key in file.keys():
                    report.weights_compared += 1
                    label = f"{component}/{key}"
                    if key in seen or key not in expected:
                        report.weights_mismatched.append(
                            f"{label} (not in the release)" if key not in expected else f"{label} (twice)"
                        )
                        continue
                    seen.add(key)
                    converted = file.get_tensor(key)
                    original = expected[key]
                    want = io.target_dtype(original, dtype)
                    if converted.dtype != want or converted.shape != original.shape:
                        report.weights_mismatched.append(
                            f"{label} ({converted.dtype} {tuple(converted.shape)}, "
                            f"expected {want} {tuple(original.shape)})"
                        )
                        continue
                    reference = original.to(want)
                    if not torch.equal(converted, reference):
                        diff = (
                            _max_abs(converted.float() - reference.float()) if converted.is_floating_point() else 1.0
                        )
                        max_diff = max(max_diff, diff if math.isfinite(diff) else float("inf"))
                        report.weights_mismatched.append(f"{label} (max abs diff {diff:.3g})")
                    releaser.release(original)
                    del converted, reference
        for key in sorted(set(expected) - seen):
            report.weights_mismatched.append(f"{component}/{key} (missing)")
    report.weights_max_abs_diff = max_diff


def _round_parameters(module: torch.nn.Module, stored: torch.dtype) -> None:
    """Rounds the parameters (not the buffers, such as RoPE's) to the stored dtype, keeping their compute dtype."""
    for parameter in module.parameters():
        if parameter.is_floating_point() and parameter.dtype != stored:
            parameter.data = parameter.data.to(stored).to(parameter.dtype)


def _vision_config(components: L.OriginalComponents) -> CLIPVisionConfig:
    vision = L._vision_config(components.clip_dir)
    return CLIPVisionConfig(**(vision if vision is not None else CLIP_VIT_L_14_VISION_CONFIG))


@torch.no_grad()
def verify_conversion(
    original_dir: str | Path,
    converted_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    check_weights: bool = True,
) -> VerificationReport:
    """Compares `converted_dir` (this package's layout) with `original_dir` (the release); see the module docstring.

    Args:
        dtype: the dtype the floating-point weights were converted to (None: the one `mllm/config.json` records).
        compute_dtype: the precision both sides run in.
        device: where both sides run.
        atol: absolute tolerance of the output checks (None: the compute dtype's in `DEFAULT_TOLERANCES`).
        rtol: relative tolerance of the output checks (None: the compute dtype's in `DEFAULT_TOLERANCES`).
    """
    from ..modeling import DreamLLMForConditionalGeneration  # lazily: the converted side only

    start = time.perf_counter()
    original_dir, converted_dir = Path(original_dir), Path(converted_dir)
    device = torch.device(device)
    default_atol, default_rtol = DEFAULT_TOLERANCES.get(compute_dtype, (1e-2, 1e-2))
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    report = VerificationReport(compute_dtype=str(compute_dtype).removeprefix("torch."), device=str(device), seed=seed)

    original_config = L.read_original_config(original_dir)
    components = L.resolve_components(original_config, original_dir)
    ids = L.special_token_ids(original_config, L.read_added_tokens(original_dir))
    releaser = io.PageReleaser()
    state_dicts = {}
    for file in L.WEIGHT_FILES:
        state_dicts[file] = io.load_original_state_dict(original_dir / file)
        releaser.register(original_dir / file)
    if dtype is None:  # what the converter recorded; the tensors must then be exactly that
        recorded = json.loads((converted_dir / "mllm" / "config.json").read_text()).get("dtype")
        dtype = getattr(torch, recorded, None) if isinstance(recorded, str) else None
        dtype = dtype if isinstance(dtype, torch.dtype) else None
    if check_weights:
        _check_weights(converted_dir, L.split_release_tensors(state_dicts), dtype, report, releaser)
    # The reference reads the release's tensors as the conversion was asked to store them (`dtype`), then computes in
    # `compute_dtype`: a float16 conversion is compared with the release rounded to float16, not with the bf16 values.
    stored = dtype or compute_dtype

    # Fixed random inputs.
    generator = torch.Generator().manual_seed(seed)
    vision_config = _vision_config(components)
    num_image_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    first_added = min(ids[token] for token in (C.PAD_TOKEN, *C.RELEASE_ADDED_TOKEN_IDS))
    text = [torch.randint(3, first_added, (n,), generator=generator).tolist() for n in (5, 7, 9)]
    image_ids = [ids[C.IMAGE_START_TOKEN]] + [ids[C.IMAGE_PATCH_TOKEN]] * num_image_tokens + [ids[C.IMAGE_END_TOKEN]]
    sequence = torch.tensor([[ids[C.BOS_TOKEN], *text[0], *image_ids, *text[1]]], device=device)
    slot = 1 + len(text[0]) + 1  # first image slot, right after <im_start>
    caption = torch.tensor([[ids[C.BOS_TOKEN], *text[2]]], device=device)
    size = vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=generator).to(device, compute_dtype)

    # --- reference language + vision side, straight from the release's state dicts -----------------------------------
    llm_sd, clip_sd = state_dicts[L.LLM_FILE], state_dicts[L.CLIP_FILE]
    text_config = LlamaConfig(**{key: original_config[key] for key in L.LLAMA_FIELDS if key in original_config})
    with torch.device("meta"):
        wanted = set(LlamaForCausalLM(text_config).state_dict())
    missing = wanted - set(llm_sd)
    if missing:
        raise L.OriginalCheckpointError(f"{L.LLM_FILE} lacks {sorted(missing)[:5]} ...")
    llm = (
        LlamaForCausalLM.from_pretrained(
            None, config=text_config, state_dict={k: v for k, v in llm_sd.items() if k in wanted}, dtype=compute_dtype
        )
        .to(device)
        .eval()
    )
    clip = (
        CLIPVisionModel.from_pretrained(
            None,
            config=vision_config,
            dtype=compute_dtype,
            state_dict={
                k[len(CLIP_PREFIX) :]: v
                for k, v in clip_sd.items()
                if k.startswith(CLIP_PREFIX) and not k.endswith("position_ids")
            },
        )
        .to(device)
        .eval()
    )
    if stored not in (compute_dtype, llm_sd["lm_head.weight"].dtype):  # else rounding changes nothing
        _round_parameters(llm, stored)
        _round_parameters(clip, stored)
    for tensor in (*llm_sd.values(), *clip_sd.values()):  # the reference holds its own copies: drop the mapped pages
        releaser.release(tensor)
    as_compute = lambda t: t.to(stored).to(device, compute_dtype)  # noqa: E731
    image_projector_w, image_projector_b = (
        as_compute(clip_sd["projector.projector.weight"]),
        as_compute(clip_sd["projector.projector.bias"]),
    )
    condition_projector_w = as_compute(state_dicts[L.DIFFUSION_FILE]["projector.projector.weight"])
    queries = as_compute(state_dicts[L.DREAM_FILE]["dream_queries"]).reshape(-1, text_config.hidden_size)
    select_layer = (
        original_config.get("plugins_init_kwargs", {}).get("clip_vision_embedding", {}).get("select_layer", -2)
    )

    hidden = clip(pixel_values, output_hidden_states=True).hidden_states[select_layer][:, 1:]
    ref_features = torch.nn.functional.linear(hidden, image_projector_w, image_projector_b)
    embeds = llm.get_input_embeddings()(sequence).clone()
    embeds[:, slot : slot + num_image_tokens] = ref_features
    ref_logits = llm(inputs_embeds=embeds).logits.float()
    embed = llm.get_input_embeddings()
    block = torch.cat(
        [
            embed(torch.tensor([ids[C.DREAM_START_TOKEN]], device=device)),
            queries,
            embed(torch.tensor([ids[C.DREAM_END_TOKEN]], device=device)),
        ]
    )
    dream_embeds = torch.cat([embed(caption), block.unsqueeze(0)], dim=1)
    last = llm.model(inputs_embeds=dream_embeds).last_hidden_state  # after the final RMSNorm
    ref_cond = torch.nn.functional.linear(last[:, caption.shape[1] + 1 : -1], condition_projector_w)
    del llm, clip, embeds, last
    gc.collect()

    # --- converted multimodal model ----------------------------------------------------------------------------------
    references = {
        "image features (CLIP layer -2, projector)": ref_features,
        "logits, image + text sequence": ref_logits,
        "dream conditioning (UNet encoder_hidden_states)": ref_cond,
    }

    def run_mllm():
        mllm = DreamLLMForConditionalGeneration.from_pretrained(converted_dir / "mllm", dtype=compute_dtype)
        mllm = mllm.to(device).eval()
        return [
            mllm.get_image_features(pixel_values).pooler_output,
            mllm(input_ids=sequence, pixel_values=pixel_values).logits,
            mllm.get_dream_embeddings(caption).dream_embeddings,
        ]

    _record(report, "mllm", references, run_mllm, atol, rtol)
    gc.collect()

    # --- diffusion parts -------------------------------------------------------------------------------------------
    diffusion_sd = state_dicts[L.DIFFUSION_FILE]
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        component_config = cls.load_config(components.diffusion_dir / name)
        with init_empty_weights():
            reference = cls.from_config(component_config)
        prefix = name + "."
        reference.load_state_dict(
            {
                k[len(prefix) :]: v.to(stored).to(compute_dtype)
                for k, v in diffusion_sd.items()
                if k.startswith(prefix)
            },
            strict=True,
            assign=True,
        )
        reference = reference.to(device).eval()
        if name == "unet":
            side = min(component_config["sample_size"], 32)
            latents = torch.randn(1, component_config["in_channels"], side, side, generator=generator).to(
                device, compute_dtype
            )
            timestep = torch.tensor([500], device=device)
            cond = ref_cond.to(compute_dtype)
            inputs = lambda model: [model(latents, timestep, encoder_hidden_states=cond).sample]  # noqa: E731
            names = ["UNet noise prediction (t=500, reference conditioning)"]
        else:
            side = min(component_config["sample_size"], 256)
            factor = vae_scale_factor(component_config)
            latents = torch.randn(
                1, component_config["latent_channels"], side // factor, side // factor, generator=generator
            ).to(device, compute_dtype)
            image = (
                torch.rand(1, component_config["in_channels"], side, side, generator=generator).to(
                    device, compute_dtype
                )
                * 2
                - 1
            )
            inputs = lambda model: [model.decode(latents).sample, model.encode(image).latent_dist.mean]  # noqa: E731
            names = ["VAE decode", "VAE encode (posterior mean)"]
        references = dict(zip(names, inputs(reference)))
        del reference  # no reference cycles: freed here, without a (slow) full gc pass
        _record(
            report,
            name,
            references,
            lambda: inputs(cls.from_pretrained(converted_dir / name, torch_dtype=compute_dtype).to(device).eval()),
            atol,
            rtol,
        )
    report.seconds = time.perf_counter() - start
    return report
