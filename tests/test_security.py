"""Security checks: no loader unpickles, ids and keys cannot escape their directory, servers bind to
127.0.0.1, and no config value names code to import or a file outside the presets.

The malicious pickle used throughout creates a sentinel file when it is unpickled; each test
asserts the sentinel never appears (and a control test shows the payload does create it).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from builders import Payload

from pcm.stages.contract import finish
from storage import tables
from storage.arrays import write_arrays
from storage.layout import RunLayout, StageDir
from storage.shards import ShardWriter, check_key, done_path

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the malicious pickle
@pytest.fixture
def sentinel(tmp_path: Path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "unpickling ran code"


def plant(path: Path, sentinel: Path, kind: str) -> Path:
    """Write a malicious pickle at `path`: a raw pickle, or torch.save's zip format (a real .pt file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": Payload(sentinel)}))
    else:
        torch.save({"weight": Payload(sentinel)}, path)
    return path


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_control_the_payload_runs_code_when_unpickled(tmp_path, kind):
    sentinel = tmp_path / "PWNED"
    path = plant(tmp_path / "payload.bin", sentinel, kind)
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert sentinel.exists()


# ---------------------------------------------------------------------- checkpoints
@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A real training checkpoint of a tiny PCM-Net (model, Adam state, concepts, vocab)."""
    from pcm import checkpoint
    from pcm.model import PCMNet, load_preset
    from pcm.vocab import Vocab

    cfg = load_preset("tiny").with_data_shapes(8, 12, 4, "test")
    head = {"ln_post.weight": torch.ones(12), "ln_post.bias": torch.zeros(12), "proj": torch.randn(12, 8)}
    vocab = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "dog", "cat"])
    model = PCMNet(cfg, len(vocab), torch.randn(5, 8), head)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    path = tmp_path / "train" / "0123456789abcdef" / "checkpoints" / "step-00000001"
    checkpoint.save(path, model=model, vocab=vocab,
                    config={}, clip={"model": "tiny"}, concept_names=list("abcde"), state={"step": 1}, optimizer=opt)
    checkpoint.load(path)  # loads fine before anything is planted
    return path


def test_checkpoint_files_are_readable_like_every_other_output(ckpt):
    """No checkpoint file is left 0600 (safetensors' save_file writes them so) while other outputs honour the umask."""
    from storage import atomic

    want = 0o666 & ~atomic.umask()
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in sorted(ckpt.iterdir())}
    assert "model.safetensors" in modes and "optimizer.safetensors" in modes
    assert modes == dict.fromkeys(modes, oct(want))


def _load(path: Path) -> None:
    from pcm import checkpoint

    checkpoint.load(path)


def _load_weights(path: Path) -> None:
    from pcm import checkpoint

    model, _, _ = checkpoint.load(path)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    checkpoint.load_weights(path, model, opt)


@pytest.mark.bad_input
@pytest.mark.parametrize("name, kind", [("model.bin", "torch"), ("optimizer.pt", "torch"), ("pytorch_model.bin", "pickle"),
                                        ("rng.pkl", "pickle")])
@pytest.mark.parametrize("loader", [_load, _load_weights], ids=["load", "load_weights"])
def test_checkpoint_with_an_extra_pickle_is_refused(ckpt, sentinel, name, kind, loader):
    plant(ckpt / name, sentinel, kind)
    with pytest.raises(ValueError, match=rf"refusing to load a checkpoint holding \['{name}'\]"):
        loader(ckpt)


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "concepts.safetensors"])
@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_checkpoint_file_replaced_by_a_pickle_fails_without_unpickling(ckpt, sentinel, name, kind):
    plant(ckpt / name, sentinel, kind)
    with pytest.raises(Exception, match=r"(?i)header|deserializ|safetensors"):
        _load_weights(ckpt)


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["state.json", "config.json", "vocab.json", "clip.json"])
def test_checkpoint_json_replaced_by_a_pickle_fails_without_unpickling(ckpt, sentinel, name):
    plant(ckpt / name, sentinel, "pickle")
    with pytest.raises(ValueError):  # UnicodeDecodeError or the JSON error naming the file: both ValueErrors
        _load_weights(ckpt)


# ---------------------------------------------------------------------- feature files
@pytest.fixture
def encode_dir(tmp_path: Path) -> StageDir:
    """An encode-like stage directory with one feature shard, one real shard and the CLIP head."""
    sd = RunLayout(tmp_path / "runs").stage("encode", "e" * 16)
    rng = np.random.default_rng(0)
    for kind in ("features", "real"):
        write_arrays(sd.shard_file(kind, 0, "safetensors"),
                     {"global": rng.standard_normal((2, 8)).astype(np.float16),
                      "patches": rng.standard_normal((2, 4, 12)).astype(np.float16)}, {"keys": json.dumps(["a", "b"])})
    write_arrays(sd.file("clip_head.safetensors"), {"ln_post.weight": np.ones(12, np.float32),
                                                    "ln_post.bias": np.zeros(12, np.float32),
                                                    "proj": np.ones((12, 8), np.float32)}, {"ln_eps": "1e-5"})
    return sd


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["pickle", "torch"])
@pytest.mark.parametrize("target", ["features", "real", "clip_head"])
def test_feature_file_replaced_by_a_pickle_fails_without_unpickling(encode_dir, sentinel, kind, target):
    from pcm.dataset import FeatureStore, load_clip_head
    from storage.arrays import open_arrays

    if target == "clip_head":
        path = plant(encode_dir.file("clip_head.safetensors"), sentinel, kind)
        with pytest.raises(Exception, match=r"(?i)header|deserializ"):
            load_clip_head(encode_dir)
    else:
        path = plant(encode_dir.shard_file(target, 0, "safetensors"), sentinel, kind)
        with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
            FeatureStore(encode_dir, target).shard(0)
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        open_arrays(path)


# ---------------------------------------------------------------------- model weights from outside
@pytest.mark.bad_input
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's weights-only unpickler, refusing it
@pytest.mark.parametrize("name, kind", [("weights.pt", "torch"), ("weights.bin", "pickle"),
                                        ("weights.safetensors", "torch")])
def test_clip_pretrained_file_holding_a_pickle_is_not_unpickled(tmp_path, sentinel, name, kind):
    from pcm.clip import ClipSpec, load_clip

    path = plant(tmp_path / name, sentinel, kind)
    with pytest.raises(Exception, match=r"(?i)weights only load failed|header|deserializ"):
        load_clip(ClipSpec(model="tiny", precision="fp32", pretrained=str(path)))


@pytest.fixture(scope="module")
def tiny_pipeline_dir() -> Path:
    from pcm import diffusion

    return diffusion.ensure_preset("tiny")


@pytest.mark.bad_input
@pytest.mark.parametrize("component, weights", [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")])
def test_diffusion_directory_with_pickled_weights_is_not_unpickled(tiny_pipeline_dir, tmp_path, sentinel, component,
                                                                    weights):
    from pcm import diffusion

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    (model / component / f"{weights}.safetensors").unlink()
    plant(model / component / ("diffusion_pytorch_model.bin" if component == "unet" else "pytorch_model.bin"),
          sentinel, "torch")
    with pytest.raises(Exception, match=r"(?i)weights only load failed|unable to load weights"):
        diffusion.load_pipeline(str(model))


@pytest.mark.bad_input
def test_diffusion_model_index_cannot_name_a_module_to_import(tiny_pipeline_dir, tmp_path, sentinel, monkeypatch):
    from pcm import diffusion

    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "pcm_evil_module.py").write_text(f"open({str(sentinel)!r}, 'w').close()\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(modules))  # importable, as any installed package would be
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "unet": ["pcm_evil_module", "Thing"]}))
    with pytest.raises(ValueError, match="pcm_evil_module is not one of the libraries"):
        diffusion.load_pipeline(str(model))


# ---------------------------------------------------------------------- keys, ids and names
UNSAFE_KEYS = ["../x", "..", "/etc/passwd", "a/b", "a\\b", "a.b", "a.jpg", "", " ", "a b", "a\nb", "é", "x" * 201,
               "a\x00b"]


@pytest.mark.bad_input
@pytest.mark.parametrize("key", UNSAFE_KEYS, ids=repr)
def test_check_key_refuses_escapes_and_dots(key):
    with pytest.raises(ValueError, match="invalid sample key"):
        check_key(key)


@pytest.mark.parametrize("key", ["coco-123", "demo_7", "A-z_0", "x" * 200])
def test_check_key_accepts_safe_keys(key):
    assert check_key(key) == key


@pytest.mark.bad_input
@pytest.mark.parametrize("key", ["../escape", "a.b"])
def test_shard_writer_refuses_an_unsafe_key_and_leaves_no_shard(tmp_path, key):
    tar = tmp_path / "shards" / "shard-000000.tar"
    with pytest.raises(ValueError, match="invalid sample key"):
        with ShardWriter(tar) as w:
            w.write({"__key__": "ok-1", "txt": "a dog"})
            w.write({"__key__": key, "txt": "a cat"})
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []
    assert not (tmp_path / "escape").exists() and not done_path(tar).exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["../config.json", "/etc/passwd", "a/b", "a\\b", ".lock", ".", "..", ""])
def test_stage_dir_file_names_cannot_escape(tmp_path, name):
    sd = RunLayout(tmp_path).stage("ingest", "a" * 16)
    with pytest.raises(ValueError, match="invalid output file name"):
        sd.file(name)


@pytest.mark.bad_input
def test_stage_and_shard_names_cannot_escape(tmp_path):
    layout = RunLayout(tmp_path)
    with pytest.raises(ValueError, match="unknown stage"):
        layout.stage("../ingest", "a" * 16)
    with pytest.raises(ValueError, match="invalid fingerprint"):
        layout.stage("ingest", "../../etc")
    sd = layout.stage("ingest", "a" * 16)
    with pytest.raises(ValueError, match="unknown shard kind"):
        sd.shard_dir("../features")
    with pytest.raises(ValueError, match="shard index must be >= 0"):
        sd.shard_file("shards", -1, "tar")


def _karpathy(sentid: Any = 1, imgid: Any = 1) -> str:
    return json.dumps({"images": [{"imgid": imgid, "filename": "1.jpg", "split": "train",
                                   "sentences": [{"sentid": sentid, "raw": "a dog"}]}]})


@pytest.mark.bad_input
@pytest.mark.parametrize("sentid", ["../x", "/etc/passwd", "a/b", "a.b", "a b", "a\\b", ""], ids=repr)
def test_ingest_refuses_caption_ids_that_are_not_safe_keys(tmp_path, sentid):
    from pcm.stages.ingest import IngestConfig, run_ingest

    source = tmp_path / "dataset_x.json"
    source.write_text(_karpathy(sentid=sentid))
    with pytest.raises(ValueError, match=r"images\[0\]\.sentences\[0\]: 'sentid' must be an integer or a string of"):
        run_ingest(IngestConfig(source=str(source)), RunLayout(tmp_path / "runs"))
    source = tmp_path / "captions.json"
    source.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}],
                                  "annotations": [{"id": sentid, "image_id": 1, "caption": "a dog"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\]: 'id' must be an integer or a string of"):
        run_ingest(IngestConfig(source=str(source)), RunLayout(tmp_path / "runs"))


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["../x", "a/b", "a.b", "", "x" * 65])
def test_ingest_refuses_an_unsafe_dataset_name(name):
    from pcm.stages.ingest import IngestConfig

    with pytest.raises(ValueError, match="letters, digits"):
        IngestConfig(source="x.txt", name=name)


@pytest.mark.parametrize("file_name, content", [
    ("my data.v2 (final).txt", "a dog\na cat\n"),
    ("dataset_../..evil.jsonl", '{"caption": "a dog", "image_id": "../../etc/passwd"}\n'),
    ("ünïcode-näme.csv", "caption,image_id\na dog,/abs/path\n"),
    ("dataset_x.json", _karpathy(sentid="abc-DEF_1", imgid="../not/a/file/name")),
])
def test_every_caption_id_ingest_writes_is_a_safe_key(tmp_path, file_name, content):
    from pcm.stages.ingest import IngestConfig, run_ingest

    source = tmp_path / file_name.replace("/", "_")
    source.write_text(content, encoding="utf-8")
    r = run_ingest(IngestConfig(source=str(source)), RunLayout(tmp_path / "runs"))
    ids = tables.read(Path(r.path) / "captions.parquet", tables.CAPTIONS)["caption_id"].to_pylist()
    assert ids and all(check_key(i) == i for i in ids)


@pytest.mark.bad_input
def test_synthesize_refuses_an_unsafe_caption_id_naming_the_row(tmp_path):
    from pcm.stages.synthesize import SynthesizeConfig, run_synthesize

    sd = RunLayout(tmp_path / "runs").stage("ingest", "c" * 16)
    sd.path.mkdir(parents=True)
    rows = [dict(caption_id=cid, image_id="i", split="train", text="a dog", raw_text="a dog", source="t",
                 image_path=None, references=[], status="ok", error=None) for cid in ("c-1", "../../escape")]
    tables.write(sd.file("captions.parquet"), rows, tables.CAPTIONS)
    captions = finish(sd, {"rows": 2}, 0.0)
    with pytest.raises(ValueError, match=r"captions\.parquet: row 1: invalid sample key '\.\./\.\./escape'"):
        run_synthesize(SynthesizeConfig(model="tiny", steps=1, height=32, width=32, device="cpu",
                                        progress_bar=False), captions, RunLayout(tmp_path / "runs"))
    assert not list((tmp_path / "runs" / "synthesize").rglob("*.tar"))
    assert not list(tmp_path.rglob("escape*"))


@pytest.mark.bad_input
def test_real_image_paths_cannot_escape_images_root(tmp_path):
    from PIL import Image

    from pcm.stages.encode import EncodeConfig, encode_shards
    from pcm.stages.ingest import IngestConfig, run_ingest

    outside = tmp_path / "private" / "secret.jpg"
    outside.parent.mkdir()
    Image.new("RGB", (16, 16), "red").save(outside)
    (tmp_path / "images").mkdir()
    source = tmp_path / "dataset_x.json"
    source.write_text(json.dumps({"images": [
        {"imgid": 1, "filename": "1.jpg", "split": "train", "sentences": [{"sentid": 1, "raw": "a dog"}]},
        {"imgid": 2, "filepath": "../private", "filename": "secret.jpg", "split": "test",
         "sentences": [{"sentid": 2, "raw": "a red square"}]}]}))
    root = str(tmp_path / "runs")
    try:
        captions = run_ingest(IngestConfig(source=str(source)), RunLayout(root))
    except ValueError as e:  # refusing the caption file is a fine outcome
        assert "filepath" in str(e)
        return
    syn = RunLayout(root).stage("synthesize", "d" * 16)  # no synthetic shards: only real images are encoded
    syn.path.mkdir(parents=True)
    shards = finish(syn, {}, 0.0)
    config = EncodeConfig.model_validate({"clip": {"model": "tiny", "precision": "fp32"}, "device": "cpu",
                                          "num_workers": 0, "progress_bar": False,
                                          "images_root": str(tmp_path / "images")})
    encode_shards(config, captions, shards, RunLayout(root), kind="real")
    (status,) = (tmp_path / "runs" / "encode").glob("*/real/shard-000000.status.parquet")
    (row,) = pq.read_table(status).to_pylist()
    assert row["status"] == "failed", f"{outside} was read through images_root"


# ---------------------------------------------------------------------- servers
def test_local_stack_defaults_to_loopback(tmp_path, monkeypatch):
    import inspect

    from flows import local_server
    from flows.local_server import LocalStack, free_port

    assert LocalStack.__dataclass_fields__["host"].default == "127.0.0.1"
    assert inspect.signature(free_port).parameters["host"].default == "127.0.0.1"
    stack = LocalStack(home=tmp_path, port=free_port())
    assert stack.env()["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert stack.api_url.startswith("http://127.0.0.1:")

    spawned: list[list[str]] = []

    class Exited:
        def poll(self) -> int:
            return 1

    def spawn(self, name: str, args: list[str]) -> Exited:
        spawned.append(args)
        self.procs.append(Exited())
        return Exited()

    monkeypatch.setattr(local_server.LocalStack, "_spawn", spawn)
    with pytest.raises(RuntimeError, match="exited early"):
        stack.start_server(timeout=5)
    (args,) = spawned
    assert args[1:3] == ["server", "start"] and args[args.index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize("argv, host", [([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0")])
def test_demo_binds_to_loopback_unless_told_otherwise(monkeypatch, argv, host):
    from flows import demo

    made: list[Any] = []

    class Recorder:
        def __init__(self, home: Path, host: str, port: int) -> None:
            self.host, self.port, self.home = host, port, home
            self.dashboard_url = f"http://{host}:{port}"
            made.append(self)

        def start_server(self) -> None:
            raise KeyboardInterrupt  # stop before anything starts

        def stop(self) -> None:
            pass

    monkeypatch.setattr(demo, "LocalStack", Recorder)
    assert demo.main(argv) == 130
    assert [m.host for m in made] == [host]


def _listening(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.append(address)
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the socket table from /proc (Linux)")
def test_started_prefect_server_listens_on_loopback_only(prefect_server):
    from flows.local_server import LocalStack

    # The run's shared server is a LocalStack started with its defaults (tests/prefect_server.py).
    assert prefect_server.host == LocalStack.__dataclass_fields__["host"].default
    addresses = _listening(prefect_server.port)
    assert addresses and set(addresses) == {"0100007F"}, addresses  # 127.0.0.1, little-endian hex


# ---------------------------------------------------------------------- configs never name code
@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["os.system", "DDIMScheduler", "diffusers.DDIMScheduler", "__import__('os')",
                                  "../ddim", "DDIM"])
def test_scheduler_names_resolve_through_a_fixed_table(name):
    from pcm import diffusion
    from pcm.stages.synthesize import SynthesizeConfig

    with pytest.raises(ValueError, match=r"unknown scheduler .*; expected one of dpm\+\+, ddim, euler, euler-a, lcm"):
        SynthesizeConfig(scheduler=name)
    with pytest.raises(ValueError, match="unknown scheduler"):
        diffusion.make_scheduler(name, {})


def test_every_scheduler_in_the_table_is_a_diffusers_scheduler():
    import diffusers

    from pcm import diffusion

    for name, cls in diffusion.SCHEDULERS.items():
        assert issubclass(getattr(diffusers, cls), diffusers.SchedulerMixin), name


@pytest.mark.bad_input
@pytest.mark.parametrize("build", [
    lambda: __import__("pcm.stages.synthesize").stages.synthesize.SynthesizeConfig(dtype="torch.float16"),
    lambda: __import__("pcm.stages.synthesize").stages.synthesize.SynthesizeConfig(pipeline_class="os.system"),
    lambda: __import__("pcm.clip").clip.ClipSpec(model="tiny", precision="torch.float16"),
    lambda: __import__("pcm.stages.evaluate").stages.evaluate.EvaluateConfig(published="os.system"),
    lambda: __import__("pcm.stages.train").stages.train.TrainConfig(preset="os.path"),
    lambda: __import__("pcm.stages.train").stages.train.TrainConfig(model={"__class__": "os.system"}),
    lambda: __import__("pcm.stages.encode").stages.encode.EncodeConfig(loader="pickle"),
], ids=["dtype", "extra-field", "clip-precision", "published", "train-preset", "model-field", "encode-extra"])
def test_config_fields_that_name_things_refuse_unknown_values(build):
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        build()


def test_pipeline_presets_are_names_or_explicit_toml_paths(tmp_path):
    from pcm.pipeline_presets import PRESETS
    from pcm.stages.pipeline import resolve

    with pytest.raises(ValueError, match=r"unknown preset 'os\.system': use one of .*demo.*, a \.toml file or the \.json"):
        resolve("os.system")
    explicit = tmp_path / "mine.toml"
    shutil.copy(PRESETS / "demo.toml", explicit)
    assert resolve(str(explicit)).name == "mine"          # an explicit .toml path is allowed


def _relative_name(target: Path, preset_dir: Path) -> str:
    """`target` (without suffix) as a name relative to `preset_dir`: '../../../tmp/.../evil'."""
    return os.path.relpath(target.with_suffix(""), preset_dir)


@pytest.mark.bad_input
def test_pipeline_preset_names_cannot_escape_the_preset_directory(tmp_path):
    from pcm.pipeline_presets import PRESETS
    from pcm.stages.pipeline import resolve

    evil = tmp_path / "evil.toml"
    shutil.copy(PRESETS / "demo.toml", evil)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve(_relative_name(evil, PRESETS))


@pytest.mark.bad_input
def test_model_preset_names_cannot_escape_the_preset_directory(tmp_path):
    from pcm.model import PRESETS, load_preset

    evil = tmp_path / "evil.toml"
    shutil.copy(PRESETS / "tiny.toml", evil)
    with pytest.raises(ValueError, match="not found"):
        load_preset(_relative_name(evil, PRESETS))


@pytest.mark.bad_input
def test_diffusion_preset_names_cannot_escape_the_preset_directory(tmp_path):
    from pcm import diffusion

    evil = tmp_path / "evil.json"
    shutil.copy(diffusion.PRESET_DIR / "tiny.json", evil)
    assert not diffusion.is_preset(_relative_name(evil, diffusion.PRESET_DIR))
    assert not diffusion.is_preset("../clip/tiny")


@pytest.mark.bad_input
def test_clip_preset_names_cannot_escape_the_preset_directory(tmp_path):
    from pcm.clip import PRESET_DIR, ClipSpec

    evil = tmp_path / "evil.json"
    shutil.copy(PRESET_DIR / "tiny.json", evil)
    for name in (_relative_name(evil, PRESET_DIR), "../diffusion/tiny"):
        assert not ClipSpec(model=name, pretrained=None).is_preset



@pytest.mark.heavy  # two DDP processes
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net to list listening sockets")
def test_distributed_training_listens_on_loopback_only(tmp_path, monkeypatch):
    from pcm import distributed

    monkeypatch.chdir(REPO)
    distributed.launch(["tests.dist_probe", str(tmp_path)], devices=2, poll_every=0.2)
    got = json.loads((tmp_path / "listening.json").read_text())
    assert got["sum"] == 2.0 and got["listening"], got
    loopback = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")
    assert all(addr.startswith(loopback) for addr in got["listening"]), got["listening"]


@pytest.mark.bad_input
def test_a_planted_mirror_file_in_or_above_a_local_root_uploads_nothing(tmp_path, monkeypatch, caplog):
    from pcm.demo_data import DEMO_DIR
    from pcm.stages.ingest import IngestConfig, run_ingest
    from storage import remote

    monkeypatch.setenv("PCM_MIRROR_DIR", str(tmp_path / "mirrors"))
    remote._mirror_at.cache_clear()
    uploads = []
    for upload in ("create", "replace"):
        monkeypatch.setattr(remote.Mirror, upload, lambda self, path, *a: uploads.append((self.url, path)))
    root = tmp_path / "shared" / "runs"
    for where in (root, root.parent):                     # in the root and a folder above it
        where.mkdir(parents=True, exist_ok=True)
        (where / remote.MIRROR_FILE).write_text('{"url": "s3://attacker-bucket/loot"}')
    with caplog.at_level("WARNING", logger="storage.remote"):
        r = run_ingest(IngestConfig(source=str(DEMO_DIR / "dataset_demo.json")), RunLayout(root))
    assert uploads == [] and remote.mirror_of(r.path) is None and r.path.startswith(str(root))
    assert "ignored; a run root's bucket comes only from the root given" in caplog.text
    # The mirror cache's own working copy of a URL is still one (keyed by the URL's hash).
    copy = remote.local_root("s3://bucket/prefix")
    assert remote.mirror_of(copy / "ingest").url == "s3://bucket/prefix"
    remote._mirror_at.cache_clear()
