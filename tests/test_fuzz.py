"""Fuzzing (issue 4): random YAML, text and bytes through the config loader; random bytes, random safetensors-like
headers and mutated real checkpoints through the checkpoint reader. Every case must end in success or in one of
the project's own errors (ddpm_cli.errors.DdpmError), never another exception."""
from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddpm_cli.config import RunConfig, load_config
from ddpm_cli.engine.checkpoint import Checkpoint, Header, load_checkpoint, load_state, read_header
from ddpm_cli.engine.runs import list_checkpoints, state_path
from ddpm_cli.errors import DdpmError

FUZZ = settings(max_examples=200, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _file(scratch: Path, data: bytes, name: str = "x") -> Path:
    d = scratch / uuid.uuid4().hex
    d.mkdir()
    p = d / name
    p.write_bytes(data)
    return p


def ours_or_success(fn, *args, ok_type=None):
    """Run fn; success (of ok_type when given) and DdpmError are fine; anything else fails the test."""
    try:
        out = fn(*args)
    except DdpmError as e:
        assert str(e).strip(), "a DdpmError must carry a message"
        return None
    if ok_type is not None:
        assert isinstance(out, ok_type)
    return out


# ----------------------------------------------------------------------------------------------------------
# config loader


SECTIONS = list(RunConfig.model_fields)
FIELDS = sorted({name for sec in SECTIONS for name in RunConfig.model_fields[sec].annotation.model_fields}
                | {"enabled", "holdout", "eval_every", "patience", "min_delta"})
WORDS = ["linear", "cosine", "dns", "group", "layer", "silu", "relu", "mish", "cpu", "cuda", "auto", "on", "off",
         "folder", "shapes", "cifar10", "adam", "adamw", "l1", "l2", "beta", "posterior", "fp32", "bf16", "train",
         "test", "offline", "16", "1e-3", "[1, 2]", "~", "null", "yes", "no", ".inf", "-.inf", ".nan", "0x10",
         "1_000", "2e5", "", " ", "runs", "a.b=c"]

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-40, 40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | st.sampled_from(WORDS))
keys = st.sampled_from(SECTIONS + FIELDS) | st.text(max_size=12) | st.integers(-3, 3) | st.booleans() | st.none()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(keys, inner, max_size=5), max_leaves=25)
field_maps = st.dictionaries(st.sampled_from(FIELDS + ["early_stopping"]), values, max_size=8)
plausible = st.dictionaries(st.sampled_from(SECTIONS), field_maps | values, max_size=5)
documents = plausible | values | st.dictionaries(keys, values, max_size=6)


@st.composite
def yaml_texts(draw) -> str:
    doc = draw(documents)
    text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.sampled_from(
        [None, True, False])), sort_keys=False)
    how = draw(st.sampled_from(["as-is", "as-is", "truncate", "insert", "anchor"]))
    if how == "truncate" and text:
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([":", "- ", "\t", "{", "[", "&a ", "*a", "!!python/object:os.system",
                                                 "!!binary ", "? ", "|", "'", '"', "%YAML 1.1\n", "---\n",
                                                 "\n  ", "#"])) + text[at:]
    elif how == "anchor":
        text = "base: &b {steps: 1}\n" + text + "\nextra: *b\n"
    return text


@FUZZ
@given(text=yaml_texts())
@example(text="model: " + "[" * 3000 + "]" * 3000)
@example(text="a: !!python/object/apply:os.system ['true']\n")
@example(text="train: {lr: .inf}\n")
@example(text="train:\n  steps: !!binary aGVsbG8=\n")
@example(text="? [1, 2]\n: 3\n")
@example(text="model: {channel_mults: !!set {1: null, 2: null}}\n")
@example(text="logging: {run_name: 2024-01-01}\n")
def test_config_loader_on_random_yaml(scratch, text):
    ours_or_success(load_config, _file(scratch, text.encode("utf-8"), "c.yaml"), ok_type=RunConfig)


@FUZZ
@given(text=st.text(max_size=300))
def test_config_loader_on_random_text(scratch, text):
    ours_or_success(load_config, _file(scratch, text.encode("utf-8", "surrogatepass"), "c.yaml"),
                    ok_type=RunConfig)


@FUZZ
@given(blob=st.binary(max_size=400))
@example(blob=b"\xef\xbb\xbf")  # a lone UTF-8 BOM
@example(blob=b"\x00")
def test_config_loader_on_random_bytes(scratch, blob):
    ours_or_success(load_config, _file(scratch, blob, "c.yaml"), ok_type=RunConfig)


override_keys = st.lists(st.sampled_from(SECTIONS + FIELDS) | st.text(max_size=6), min_size=0, max_size=4).map(
    ".".join)
overrides = st.builds(lambda k, sep, v: f"{k}{sep}{v}", override_keys, st.sampled_from(["=", "", "==", " = "]),
                      st.sampled_from(WORDS) | st.text(max_size=15))


@FUZZ
@given(doc=plausible, sets=st.lists(overrides, max_size=4))
def test_config_overrides_are_fuzz_safe(scratch, doc, sets):
    path = _file(scratch, yaml.safe_dump(doc).encode(), "c.yaml")
    ours_or_success(load_config, path, sets, ok_type=RunConfig)


# ----------------------------------------------------------------------------------------------------------
# checkpoint reader


def _st_file(header: object, tail: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + tail


def _every_group(path: Path) -> Checkpoint:
    """load_checkpoint, then each group of tensors it reads when asked (sampling reads one or two)."""
    ck = load_checkpoint(path)
    ck.model_state, ck.ema_state, ck.extra_ema, ck.guide_state  # noqa: B018 - each reads its tensors
    return ck


def _read_all(path: Path) -> None:
    """The reader's entry points: the header alone, then the whole checkpoint, then its training state."""
    ours_or_success(read_header, path, ok_type=Header)
    ours_or_success(read_header, path, False, ok_type=Header)
    ours_or_success(_every_group, path, ok_type=Checkpoint)
    if state_path(path).exists():
        ours_or_success(load_state, path, ok_type=tuple)


json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-10, 2000)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=10)
                | st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "ddpm-cli", "1", "99"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=15)
tensor_entries = st.fixed_dictionaries(
    {}, optional={"dtype": json_values | st.sampled_from(["F32", "I64", "U8"]),
                  "shape": json_values | st.lists(st.integers(-2, 6), max_size=3),
                  "data_offsets": json_values | st.lists(st.integers(-5, 200) | json_scalars, min_size=2,
                                                         max_size=2)}) | json_values
metadata = st.dictionaries(st.sampled_from(["format", "format_version", "config", "step", "kind", "classes"])
                           | st.text(max_size=6), json_values | st.sampled_from(["ddpm-cli", "1", "train",
                                                                                  "train-state", "{}"]),
                           max_size=5) | json_values


@st.composite
def safetensors_like(draw) -> bytes:
    header = draw(st.dictionaries(st.text(min_size=1, max_size=12), tensor_entries, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(metadata)
    tail = draw(st.binary(max_size=256))
    length = draw(st.none() | st.integers(0, 2**64 - 1) | st.integers(0, 600))
    return _st_file(header, tail, length)


@FUZZ
@given(blob=st.binary(max_size=600))
@example(blob=b"")
@example(blob=b"PK\x03\x04")
@example(blob=b"\x80\x04")
@example(blob=struct.pack("<Q", 2**64 - 1))
@example(blob=struct.pack("<Q", 2) + b"{}")
@example(blob=struct.pack("<Q", 2) + b"[]")
@example(blob=struct.pack("<Q", 4) + b"null")
def test_checkpoint_reader_on_random_bytes(scratch, blob):
    _read_all(_file(scratch, blob, "ckpt-00000001.safetensors"))


@FUZZ
@given(blob=safetensors_like())
@example(blob=_st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, float("inf")]}}, b"\0" * 8))
@example(blob=_st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, float("nan")]}}, b"\0" * 8))
@example(blob=_st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e300]}}, b"\0" * 8))
@example(blob=_st_file(b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"))
@example(blob=_st_file({"__metadata__": {"format": "ddpm-cli", "format_version": "1",
                                         "config": "[" * 5000 + "]" * 5000},
                        "model.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
@example(blob=_st_file({"__metadata__": {"format": "ddpm-cli", "format_version": "1", "config": "null"},
                        "model.w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
@example(blob=_st_file({"__metadata__": {"format": "ddpm-cli", "format_version": "1", "config": "{}"},
                        "model.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4))
@example(blob=_st_file({"__metadata__": {"format": "ddpm-cli", "format_version": "1", "config": "{}"},
                        "model.w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4))
@example(blob=_st_file({"__metadata__": {"format": "ddpm-cli", "format_version": "1" * 5000}}))
def test_checkpoint_reader_on_random_headers(scratch, blob):
    _read_all(_file(scratch, blob, "ckpt-00000001.safetensors"))


@pytest.fixture(scope="module")
def real_checkpoint(trained_run) -> tuple[bytes, bytes]:
    weights = list_checkpoints(trained_run)[-1]
    return weights.read_bytes(), state_path(weights).read_bytes()


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip-header"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1,
                                               max_size=6)),
    st.tuples(st.just("flip-anywhere"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1,
                                                 max_size=6)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1) | st.integers(-64, 64)),
    st.tuples(st.just("splice"), st.floats(0, 1), st.binary(max_size=64)),
    st.tuples(st.just("metadata"), st.sampled_from(["format", "format_version", "config", "step", "kind"]),
              st.sampled_from(["", "2", "-1", "x", "null", "[]", "{}", "train-state", "ddpm-cli", "１"])),
)


def _mutate(data: bytes, op) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    kind = op[0]
    if kind == "truncate":
        return data[:int(op[1] * len(data))]
    buf = bytearray(data)
    if kind == "flip-header":
        for pos, x in op[1]:
            buf[pos % min(8 + n, len(buf))] ^= x
    elif kind == "flip-anywhere":
        for frac, x in op[1]:
            buf[min(int(frac * len(buf)), len(buf) - 1)] ^= x
    elif kind == "length":
        value = op[1] if op[1] >= 0 else max(0, n + op[1])
        buf[:8] = struct.pack("<Q", value)
    elif kind == "splice":
        at = int(op[1] * len(buf))
        return bytes(buf[:at]) + op[2] + bytes(buf[at:])
    elif kind == "metadata":
        try:
            header = json.loads(data[8:8 + n])
            header["__metadata__"][op[1]] = op[2]
        except Exception:  # an earlier mutation broke the header: nothing to edit
            return data
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    return bytes(buf)


@settings(FUZZ, max_examples=150)
@given(ops=st.lists(mutation, min_size=1, max_size=3), which=st.sampled_from(["weights", "state", "both"]))
def test_checkpoint_reader_on_mutated_real_checkpoints(scratch, real_checkpoint, ops, which):
    weights, state = real_checkpoint
    for op in ops:
        if which in ("weights", "both"):
            weights = _mutate(weights, op) if len(weights) >= 8 else weights
        if which in ("state", "both"):
            state = _mutate(state, op) if len(state) >= 8 else state
    path = _file(scratch, weights, "ckpt-00000020.safetensors")
    state_path(path).write_bytes(state)
    _read_all(path)


def test_unmutated_real_checkpoint_reads(scratch, real_checkpoint):
    """Control for the mutation fuzz: the original files read fine."""
    weights, state = real_checkpoint
    path = _file(scratch, weights, "ckpt-00000020.safetensors")
    state_path(path).write_bytes(state)
    assert isinstance(load_checkpoint(path), Checkpoint)
    tensors, st_json, groups = load_state(path)
    assert st_json["step"] == 20 and groups


# ----------------------------------------------------------------------------------------------------------
# `ddpm inspect` on whatever the reader accepts: it shows what it can read and refuses nothing it could read


def _ddpm_header(config: dict, tensors: dict | None = None) -> bytes:
    meta = {"format": "ddpm-cli", "format_version": "1", "config": json.dumps(config)}
    return _st_file({"__metadata__": meta, **(tensors or {"model.w": {"dtype": "F32", "shape": [1],
                                                                      "data_offsets": [0, 4]}})}, b"\0" * 4)


def _no_nan(text: str):
    def refuse(c):
        raise AssertionError(f"{c} is not JSON")
    return json.loads(text, parse_constant=refuse)


@FUZZ
@given(blob=safetensors_like())
@example(blob=_ddpm_header({}, {"model.w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}))
@example(blob=_ddpm_header({}, {"model.w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}))
@example(blob=_ddpm_header({"model": {"attention_resolutions": 8, "channel_mults": 5}}))
@example(blob=_ddpm_header({"model": {"image_size": [16, 32], "attention_resolutions": ["8"]}}))
@example(blob=_ddpm_header({"model": {"image_size": [0, 0], "attention_resolutions": [8]}}))
@example(blob=_ddpm_header({"train": {"guide_weight": float("nan"), "guide_step": 5}}))
@example(blob=b"?\x00\x00\x00\x00\x00\x00\x00" + b'{"__metadata__": {"format": "ddpm-cli", "kind": "train-state"}}')
def test_inspect_shows_any_header_the_reader_accepts(scratch, blob):
    """Any header the reader accepts is shown, or, for a run's file that is no checkpoint (a training state, a
    post-hoc EMA snapshot), refused in the one line that says what to pass instead."""
    from conftest import cli

    from ddpm_cli.engine.checkpoint.format import refuse_other_kinds

    path = _file(scratch, blob, "ckpt-00000001.safetensors")
    header = ours_or_success(read_header, path, ok_type=Header)
    if header is None:
        return  # refused by the reader, in one line: tested above
    try:
        refuse_other_kinds(path, header)
        other_kind = None
    except DdpmError as e:
        other_kind = str(e)
    for args in ([path], [path, "--json"]):
        r = cli("inspect", *args)
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        if other_kind is not None:
            assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
            assert " ".join(other_kind.split()) in " ".join(r.output.split()), r.output  # what to pass instead
            continue
        assert r.exit_code == 0, r.output
    if other_kind is None:
        _no_nan(r.stdout)
