"""Execution providers on a CPU-only machine: selection ("auto", names, aliases, (name, options)
pairs), errors naming what was asked and what is there, silent-fallback detection, the IO-binding
backend on the CPU EP (same results as a plain run and as the PyTorch reference, buffers reused,
fixed-shape/CUDA-graph plumbing, DLPack outputs), TensorRT options and profiles, warm-up."""
from __future__ import annotations

import logging
import threading

import numpy as np
import onnxruntime as ort
import pytest

from bgert.runtime import Embedder, ProviderError
from bgert.runtime import iobinding, ort_backend, providers, tensorrt
from bgert.runtime.backends import OrtBackend, session_options
from bgert.runtime.iobinding import IoBindingBackend, bucket_shapes
from bgert.runtime.providers import CPU, CUDA, TENSORRT, resolve_providers

TEXTS = ["hi", "what is panda?", "The giant panda is a bear species endemic to China. " * 3,
         "北京是中华人民共和国的首都。", "panda " * 200, "BM25 ranks a set of documents.", "a"] * 2
REAL_GPU = CUDA in ort.get_available_providers()


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture
def fake_gpu_build(monkeypatch):
    """Make this CPU onnxruntime claim CUDA and TensorRT, as onnxruntime-gpu does without the libraries."""
    real, works = ort.get_available_providers, providers.provider_works
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, *real()])
    works.cache_clear()
    yield
    works.cache_clear()  # probes made while faking must not outlive it


@pytest.fixture(scope="module")
def small_model(tiny_mean_art):
    """A small token budget, so TEXTS span several batches and buckets."""
    return dict(model_dir=tiny_mean_art, token_budget=256, length_buckets=[16, 32, 64, 128])


# ---- provider selection ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [None, "cpu", "CPU", "CPUExecutionProvider", "cpuexecutionprovider", ["cpu"],
                                  "auto", "AUTO"])
def test_names_and_aliases_resolve_to_cpu(spec):
    if str(spec).lower() == "auto" and REAL_GPU:
        pytest.skip("a GPU build picks its GPU providers")
    assert resolve_providers(spec) == [CPU]


def test_name_options_pairs_are_kept():
    opts = {"arena_extend_strategy": "kSameAsRequested"}
    assert resolve_providers(("cpu", opts)) == [(CPU, opts)]
    assert resolve_providers([("CPUExecutionProvider", opts)]) == [(CPU, opts)]
    assert providers.provider_names([(CPU, opts)]) == [CPU]


@pytest.mark.parametrize("spec, words", [
    ("cdua", ["'cdua'", "cuda", "tensorrt", CPU]),
    ([], ["non-empty"]),
    (["cpu", "CPUExecutionProvider"], ["twice"]),
    ([("cpu", "kSameAsRequested")], ["(name, options dict)"]),
    ([42], ["42"]),
])
def test_bad_requests_say_what_was_asked_and_what_is_there(spec, words):
    with pytest.raises(ProviderError) as e:
        resolve_providers(spec)
    for w in words:
        assert w in str(e.value)


@pytest.mark.skipif(REAL_GPU, reason="needs a CPU-only onnxruntime")
def test_gpu_provider_on_cpu_build_names_both_sides():
    with pytest.raises(ProviderError) as e:
        resolve_providers("cuda")
    msg = str(e.value)
    assert CUDA in msg and "'cuda'" in msg and CPU in msg and "onnxruntime-gpu" in msg


def test_auto_probes_gpu_providers_before_picking_them(fake_gpu_build, monkeypatch):
    # listed but not loadable (the CPU build drops them): 'auto' must not pick them
    assert resolve_providers("auto") == [CPU]
    monkeypatch.setattr(providers, "provider_works", lambda name: name in (CUDA, CPU))
    assert resolve_providers("auto") == [CUDA, CPU]


def test_probe_model_is_valid_onnx_and_runs():
    import onnx

    model = onnx.load_from_string(providers.probe_model())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Relu"]
    assert providers.provider_works(CPU)


def test_silent_fallback_to_cpu_is_an_error(fake_gpu_build, tiny_mean_art):
    model = Embedder(tiny_mean_art, providers="cuda", io_binding=False)
    with pytest.raises(ProviderError) as e:
        model.encode(["hi"])
    msg = str(e.value)
    assert "asked for" in msg and "silently dropped CUDAExecutionProvider" in msg and CPU in msg


def test_unknown_backend_option_is_rejected(tiny_mean_art):
    with pytest.raises(TypeError, match="io_bindng.*io_binding"):
        Embedder(tiny_mean_art, io_bindng=True)


# ---- IO binding on the CPU EP ------------------------------------------------------------------------
def test_io_binding_matches_plain_run_and_pytorch(small_model, tiny_mean):
    from sentence_transformers import SentenceTransformer

    plain = Embedder(**small_model).encode(TEXTS)
    model = Embedder(**small_model, io_binding=True)
    got = model.encode(TEXTS)
    backend = model.backend_for(model.graph())
    assert isinstance(backend, IoBindingBackend) and backend.device == "cpu"
    assert np.array_equal(got, plain)
    ref = SentenceTransformer(tiny_mean, device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert cos_rows(ref, got).min() >= 0.99999
    # buffers: one set per bucket length, sized by the batch cut, reused (same addresses) by later calls
    hint = bucket_shapes(model.length_buckets, model.token_budget, model.batch_size)
    assert backend.buffers == {length: hint[length] for length in backend.buffers} and len(backend.buffers) >= 3
    ptrs = {k: s.inputs["input_ids"].data_ptr() for k, s in backend._slots.items()}
    again = model.encode(list(reversed(TEXTS)))
    assert np.array_equal(again, plain[::-1])
    assert ptrs == {k: s.inputs["input_ids"].data_ptr() for k, s in backend._slots.items()}


def test_plain_ort_backend_stays_default_on_cpu(small_model):
    model = Embedder(**small_model)
    assert type(model.backend_for(model.graph())) is OrtBackend


def test_fixed_shapes_pad_rows_and_give_each_shape_a_graph_id(small_model):
    """The CUDA-graph path (power-of-two rows, gpu_graph_id per shape) run on the CPU EP."""
    model = Embedder(**small_model)
    path = model.manifest.path(model.graph().file)
    be = IoBindingBackend(path, [CPU], session_options(), shapes={16: 12}, fixed_shapes=True)
    plain = OrtBackend(path, [CPU], session_options())
    rng = np.random.default_rng(0)
    for n in (3, 3, 5, 1, 12, 3):
        ids = rng.integers(5, model.tokenizer.vocab_size, size=(n, 16))
        mask = np.ones_like(ids)
        mask[:, 10:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        out = be.run(feeds, ["dense"])[0]
        assert out.shape == (n, model.dim)
        assert np.abs(out - plain.run(feeds, ["dense"])[0]).max() <= 1e-6
    assert be.buffers == {16: 16}  # 12 rows rounded up to a power of two
    # first sight of a shape runs uncaptured (output shapes unknown), later ones get one id per shape
    assert sorted(k[1] for k in be.graph_ids) == [1, 4, 8, 16]
    assert len(set(be.graph_ids.values())) == 4
    assert be._run_options[be.graph_ids[(16, 4, ("dense",), 0)]].get_run_config_entry("gpu_graph_id") == str(
        be.graph_ids[(16, 4, ("dense",), 0)])
    # a bigger batch than the buffers hold: they grow, and shapes get new graph ids
    be.run({"input_ids": np.ones((20, 16), np.int64), "attention_mask": np.ones((20, 16), np.int64)}, ["dense"])
    assert be.buffers == {16: 32} and be._slots[16].generation == 1


def test_device_outputs_via_dlpack_are_copies(small_model):
    torch = pytest.importorskip("torch")
    model = Embedder(**small_model, io_binding=True)
    be = model.backend_for(model.graph())
    a = {"input_ids": np.full((2, 16), 7, np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    b = {"input_ids": np.full((2, 16), 9, np.int64), "attention_mask": np.ones((2, 16), np.int64)}
    host = be.run(a, ["dense"])[0]
    as_torch = be.run_device(a, ["dense"], like="torch")[0]
    as_numpy = be.run_device(a, ["dense"], like="numpy")[0]
    be.run(b, ["dense"])  # reuses the buffers: earlier results must not change
    assert isinstance(as_torch, torch.Tensor) and np.array_equal(as_torch.numpy(), host)
    assert np.array_equal(as_numpy, host)
    with pytest.raises(ImportError, match="no_such_lib"):
        be.run_device(a, ["dense"], like="no_such_lib")


def test_io_binding_is_thread_safe(small_model):
    model = Embedder(**small_model, io_binding=True)
    expected = model.encode(TEXTS)
    results, errors = [], []

    def work(i):
        try:
            texts = TEXTS[i:] + TEXTS[:i]
            results.append((i, model.encode(texts)))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, got in results:
        assert np.array_equal(got, np.concatenate([expected[i:], expected[:i]]))


# ---- CUDA / TensorRT options -----------------------------------------------------------------------
def test_cuda_options_and_cuda_graph_plumbing(small_model):
    assert providers.cuda_options("fp32") == {"device_id": "0", "use_tf32": "0"}
    assert providers.cuda_options("fp16", cuda_graph=True, device_id=1) == {
        "device_id": "1", "use_tf32": "1", "enable_cuda_graph": "1"}
    with pytest.raises(ProviderError, match="cuda_graph=True needs the CUDA"):
        Embedder(**small_model, cuda_graph=True).encode(["hi"])
    path = Embedder(**small_model).manifest.path("model.onnx")
    with pytest.raises(ValueError, match="fixed_shapes"):
        IoBindingBackend(path, [CPU], session_options(), cuda_graph=True, fixed_shapes=False)
    with pytest.raises(ProviderError, match="CUDA graphs need the CUDA provider"):
        IoBindingBackend(path, [CPU], session_options(), cuda_graph=True)


def test_profile_strings_from_buckets():
    shapes = bucket_shapes([16, 64, 512], token_budget=16384, batch_size=256)
    assert shapes == {16: 256, 64: 256, 512: 32}
    names = ["input_ids", "attention_mask"]
    single = tensorrt.profile_shapes(names, shapes)
    assert single == {"trt_profile_min_shapes": "input_ids:1x16,attention_mask:1x16",
                      "trt_profile_opt_shapes": "input_ids:256x64,attention_mask:256x64",
                      "trt_profile_max_shapes": "input_ids:256x512,attention_mask:256x512"}
    per = tensorrt.profile_shapes(names, shapes, "per-bucket")
    assert per["trt_profile_min_shapes"] == ("input_ids:1x16,attention_mask:1x16,input_ids:1x64,attention_mask:1x64,"
                                             "input_ids:1x512,attention_mask:1x512")
    assert per["trt_profile_max_shapes"].endswith("input_ids:32x512,attention_mask:32x512")
    with pytest.raises(ValueError, match="per-bucket"):
        tensorrt.profile_shapes(names, shapes, "dynamic")


def test_tensorrt_options_from_manifest(small_model, tmp_path, caplog):
    model = Embedder(**small_model)
    graph = model.graph()
    shapes = bucket_shapes(model.length_buckets, model.token_budget, model.batch_size)
    with caplog.at_level(logging.WARNING, logger="bgert"):
        opts = tensorrt.tensorrt_options(model.manifest, graph, shapes, cache_dir=str(tmp_path))
    assert "TensorRT cannot run" in caplog.text and "Attention" in caplog.text  # the artifact is ORT-fused
    sha = model.manifest.get("files")[graph.file][:16]
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_engine_cache_path"] == str(tmp_path / sha)
    assert opts["trt_timing_cache_enable"] == "True" and opts["trt_timing_cache_path"] == str(tmp_path)
    assert (tmp_path / sha).is_dir()
    assert opts["trt_fp16_enable"] == "False" and opts["trt_int8_enable"] == "False"
    assert opts["trt_profile_max_shapes"] == "input_ids:16x128,attention_mask:16x128"
    assert tensorrt.precision_flags("fp16")["trt_fp16_enable"] == "True"
    assert tensorrt.precision_flags("int8-static") == {"trt_fp16_enable": "True", "trt_int8_enable": "True",
                                                       "trt_layer_norm_fp32_fallback": "True"}
    with pytest.raises(ProviderError, match="int8-static"):
        tensorrt.precision_flags("int8")


def test_make_ort_backend_merges_derived_and_caller_options(fake_gpu_build, monkeypatch, small_model, tmp_path):
    made = {}

    class Recorder:
        def __init__(self, path, provider_list, options, **kwargs):
            made.update(providers=provider_list, kwargs=kwargs)

    monkeypatch.setattr(iobinding, "IoBindingBackend", Recorder)
    model = Embedder(**small_model)
    shapes = bucket_shapes(model.length_buckets, model.token_budget, model.batch_size)
    asked = resolve_providers([("tensorrt", {"trt_fp16_enable": "True", "device_id": 1})])
    ort_backend.make_ort_backend("m.onnx", model.manifest, model.graph(), asked, session_options(), shapes,
                               cuda_graph=True, tensorrt_cache_dir=str(tmp_path))
    (trt_name, trt), (cuda_name, cuda) = made["providers"]
    assert (trt_name, cuda_name) == (TENSORRT, CUDA)  # CUDA added behind TensorRT for the nodes it rejects
    assert trt["trt_fp16_enable"] == "True" and trt["device_id"] == 1  # the caller's options win
    assert trt["trt_cuda_graph_enable"] == "True" and trt["trt_engine_cache_path"].startswith(str(tmp_path))
    assert cuda == {"device_id": "1", "use_tf32": "0", "enable_cuda_graph": "1"}
    assert made["kwargs"] == {"shapes": shapes, "cuda_graph": True, "device_id": 1}
    with pytest.raises(ProviderError, match="needs IO binding"):
        ort_backend.make_ort_backend("m.onnx", model.manifest, model.graph(), asked, session_options(), shapes,
                                   cuda_graph=True, io_binding=False)


def test_warmup_runs_every_bucket_once_per_size(small_model):
    model = Embedder(**small_model, io_binding=True)
    took = tensorrt.warmup(model)
    shapes = bucket_shapes(model.length_buckets, model.token_budget, model.batch_size)
    assert sorted(took) == sorted({(n, length) for length, rows in shapes.items() for n in (1, rows)})
    assert model.backend_for(model.graph()).buffers == shapes


# ---- the GPU benchmark's CPU mode ----------------------------------------------------------------------
def test_gpu_bench_dry_run_on_cpu(tmp_path):
    import json

    from bgert.benchmarks import gpu_bench

    out = tmp_path / "results"
    assert gpu_bench.main(["--dry-run", "--tiny", "--models", "bge-base", "--short", "4", "--mixed", "4",
                           "--long", "2", "--latency", "1", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads((out / "gpu_dryrun-cpu.json").read_text())
    (model,) = report["models"].values()
    rows = model["variants"]
    assert {"torch-fp32", "torch-fp16", "ort-cpu-fp32", "ort-cpu-fp32-iobinding"} <= set(rows)
    for name in ("ort-cpu-fp32", "ort-cpu-fp32-iobinding"):
        assert rows[name]["mixed"]["cos_min"] >= 0.99999 and rows[name]["long"]["texts_per_s"] > 0
    assert rows["ort-cpu-fp32-iobinding"]["backend"] == "IoBindingBackend"
    assert "| ort-cpu-fp32-iobinding |" in (out / "gpu_dryrun-cpu.md").read_text()
