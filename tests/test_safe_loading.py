"""Safe loading: weights never unpickle code, a repository's code never runs unless trusted, secrets never reach
logs or the run directory."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lifecycle.models import ModelBundle, build_bundle
from lifecycle.models.folded_unet import FramesAsChannelsUNet
from lifecycle.secrets import MARKER, is_secret_name, protect, redact
from lifecycle.stages.runner import lineage

from .helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"unet": "diffusion_pytorch_model", "text_encoder": "model"}


class CreatesFile:
    """Unpickling this creates `path`: what a malicious checkpoint does (with os.system in place of open)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """The tiny default model, exported."""
    root = tmp_path_factory.mktemp("export")
    build_bundle(compose_cfg(root / "run").model).save_pretrained(root / "export")
    return root / "export"


@pytest.fixture
def folder(export, tmp_path):
    """A copy of the export to tamper with, and the file whose existence would show that code ran."""
    shutil.copytree(export, tmp_path / "model")
    return tmp_path / "model", tmp_path / "code-ran"


def pickle_only(model: Path, component: str, payload) -> Path:
    """Replace a component's safetensors weights with a .bin pickle of `payload`."""
    (model / component / f"{WEIGHTS[component]}.safetensors").unlink()
    path = model / component / ("diffusion_pytorch_model.bin" if component == "unet" else "pytorch_model.bin")
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_a_pickle_that_runs_code_is_refused_and_never_unpickled(folder, component):
    model, marker = folder
    path = pickle_only(model, component, {"weight": CreatesFile(marker)})
    with pytest.raises(ValueError, match=rf"{path.name}: refused to load pickled weights .*weights_only=True"):
        ModelBundle.from_pretrained(str(model))
    assert not marker.exists()
    # the libraries' own loaders use weights_only=True as well (diffusers 0.42, transformers 5)
    loader = FramesAsChannelsUNet if component == "unet" else __import__("transformers").CLIPTextModel
    with pytest.raises(Exception):  # noqa: B017 - each library refuses in its own way
        loader.from_pretrained(str(model), subfolder=component)
    assert not marker.exists()


def test_a_plain_tensor_pickle_still_loads(folder, export):
    model, _ = folder
    pickle_only(model, "unet", load_file(export / "unet" / "diffusion_pytorch_model.safetensors"))
    loaded = ModelBundle.from_pretrained(str(model))
    reference = ModelBundle.from_pretrained(str(export))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


def test_model_index_naming_another_library_needs_trust_remote_code(folder, tmp_path, monkeypatch):
    model, marker = folder
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "marker_lib.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\n"
        "class Part:\n    @classmethod\n    def from_pretrained(cls, *args, **kwargs):\n        return None\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "vae": ["marker_lib", "Part"]}))
    with pytest.raises(ValueError, match=r"vae with marker_lib.Part; .*unless model.trust_remote_code is true"):
        build_bundle(compose_cfg(tmp_path / "run", f"model.pretrained={model}").model)
    assert not marker.exists() and "marker_lib" not in sys.modules
    try:
        bundle = build_bundle(compose_cfg(tmp_path / "run", f"model.pretrained={model}",
                                          "model.trust_remote_code=true").model)
    finally:
        sys.modules.pop("marker_lib", None)
    assert marker.exists() and bundle.vae is None


def test_a_tokenizer_with_custom_code_is_refused(folder):
    model, marker = folder
    config_file = model / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "tokenizer_class": "CustomTokenizer",
                                       "auto_map": {"AutoTokenizer": [None, "custom.CustomTokenizer"]}}))
    (model / "tokenizer" / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        ModelBundle.from_pretrained(str(model))
    assert not marker.exists()


def test_a_component_named_by_an_auto_class_runs_no_repository_code(folder, monkeypatch):
    """model_index.json naming `transformers.AutoModel` for a folder whose config maps to its own code: refused with
    the key to set, never transformers' interactive "trust remote code? [y/N]" prompt (here a user who answers y)."""
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *question: prompts.append(question) or "y")
    model, marker = folder
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "AutoModel"]}))
    config_file = model / "text_encoder" / "config.json"
    auto = {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"}
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "custom", "auto_map": auto}))
    (model / "text_encoder" / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        ModelBundle.from_pretrained(str(model))
    assert not prompts and not marker.exists()


@pytest.fixture
def remote_code_repo(tmp_path):
    """A model folder whose config names its own code (auto_map), which creates a file when imported."""
    repo, marker = tmp_path / "repo", tmp_path / "code-ran"
    repo.mkdir()
    auto = {f"Auto{k}": "custom.Custom" for k in ("Config", "ModelForImageClassification", "ModelForImageTextToText")}
    (repo / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": auto}))
    (repo / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return str(repo), marker


@pytest.mark.parametrize("load", ["reward", "safety", "vlm"])
def test_reward_safety_and_vlm_models_never_run_repository_code_by_default(remote_code_repo, load):
    from lifecycle.curation.safety import SafetyFilter
    from lifecycle.curation.vlm import VLMCaptioner
    from lifecycle.rewards.clip import AestheticReward

    repo, marker = remote_code_repo
    build = {"reward": lambda: AestheticReward(clip=repo), "safety": lambda: SafetyFilter(repo, device="cpu"),
             "vlm": lambda: VLMCaptioner(repo, device="cpu")}[load]
    with pytest.raises(ValueError, match="trust_remote_code"):
        build()
    assert not marker.exists()


SECRET, ENV_SECRET = "hf_SECRETxyz123", "hf_ENVsecret456"


def test_secret_names():
    assert all(map(is_secret_name, ["token", "model.hf_token", "HF_TOKEN", "WANDB_API_KEY", "apikey", "db.password",
                                    "AWS_SECRET_ACCESS_KEY", "client_secret", "SECRET_KEY", "credentials"]))
    assert not any(map(is_secret_name, ["pad_token_id", "max_new_tokens", "TOKENIZERS_PARALLELISM", "tokenizer"]))


def test_redact_keeps_interpolations_and_masks_values_and_overrides():
    config = {"model": {"token": SECRET, "pretrained": "org/name"}, "env": {"api_key": "${oc.env:WANDB_API_KEY}"},
              "overrides": [f"+model.token={SECRET}", f"data.shards=/data/{ENV_SECRET}"], "seed": 0}
    assert redact(config, {ENV_SECRET}) == {
        "model": {"token": MARKER, "pretrained": "org/name"}, "env": {"api_key": "${oc.env:WANDB_API_KEY}"},
        "overrides": [f"+model.token={MARKER}", f"data.shards=/data/{MARKER}"], "seed": 0}


def test_log_records_are_masked_on_every_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", ENV_SECRET)
    monkeypatch.setenv("MY_HUB_TOKEN", SECRET)
    cfg = compose_cfg(tmp_path, "+model.token=${oc.env:MY_HUB_TOKEN}")
    handler = logging.FileHandler(tmp_path / "run.log")
    logging.getLogger().addHandler(handler)
    try:
        protect(cfg)
        log = logging.getLogger("lifecycle.test")
        log.warning("token %s and key %s", SECRET, ENV_SECRET)
        try:
            raise RuntimeError(f"failed with {ENV_SECRET}")
        except RuntimeError:
            log.exception("load failed")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = (tmp_path / "run.log").read_text()
    assert SECRET not in text and ENV_SECRET not in text
    assert f"token {MARKER} and key {MARKER}" in text and f"RuntimeError: failed with {MARKER}" in text


def test_lineage_redacts_the_resolved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)
    cfg = compose_cfg(tmp_path, "+model.token=${oc.env:HF_TOKEN}")
    made = json.dumps(lineage(cfg, tmp_path, 3, data=f"/data/{ENV_SECRET}"))
    assert ENV_SECRET not in made
    assert json.loads(made)["config"]["model"]["token"] == MARKER and json.loads(made)["data"] == f"/data/{MARKER}"


def _cli(run, *overrides, env: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", **env}
    return subprocess.run([sys.executable, "-m", "lifecycle", *overrides, f"hydra.run.dir={run}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _nowhere(secrets, out: subprocess.CompletedProcess, run) -> None:
    """None of `secrets` in the console output or in any file of the run directory."""
    files = [p for p in run.rglob("*") if p.is_file()]
    for text in [out.stdout, out.stderr, *(p.read_text(errors="replace") for p in files)]:
        assert not any(s in text for s in secrets)


def test_no_secret_reaches_the_run_directory_or_the_console(tmp_path):
    """An environment secret that ends up in a logged message."""
    run = tmp_path / "run"
    out = _cli(run, "+model.token=${oc.env:HF_TOKEN}", "data.generate=null", "data.shards=/no/${oc.env:HF_TOKEN}",
               env={"HF_TOKEN": ENV_SECRET})
    assert out.returncode == 2 and f"data.shards: '/no/{MARKER}' does not exist" in out.stdout + out.stderr
    assert {p.name for p in run.rglob("*") if p.is_file()} >= {"config.yaml", "overrides.yaml", "hydra.yaml",
                                                                 "__main__.log"}
    _nowhere([ENV_SECRET], out, run)
    assert "data.shards: '/no/***REDACTED***'" in (run / "__main__.log").read_text()


def test_a_literal_secret_in_the_config_is_refused_in_one_line(tmp_path):
    """Before: accepted, masked in logs, but recorded as typed in wandb's run metadata and Hydra's error line."""
    run = tmp_path / "run"
    out = _cli(run, f"+model.token={SECRET}", env={})
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "config error" in line]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stdout + out.stderr
    assert errors[0].endswith("config error: model.token: a literal secret in the config; pass it from an "
                              "environment variable: model.token=${oc.env:YOUR_VARIABLE}")
    _nowhere([SECRET], out, run)
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert MARKER in (run / ".hydra" / name).read_text()


def explode(cfg):
    """A stage that fails with an error that is not a configuration problem, naming a secret."""
    raise RuntimeError(f"upstream refused {os.environ['HF_TOKEN']}")


def test_a_failing_run_logs_its_error_masked_and_hydra_prints_no_overrides(tmp_path):
    """Before: Hydra wrote `Error executing job with overrides: [...]` to stderr, unmasked, then the traceback."""
    run = tmp_path / "run"
    out = _cli(run, f"stage.run={__name__}.explode", f"prompts.train=[{ENV_SECRET}]", env={"HF_TOKEN": ENV_SECRET})
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Error executing job with overrides" not in out.stdout + out.stderr
    assert f"RuntimeError: upstream refused {MARKER}" in out.stdout + out.stderr  # logged, with its traceback
    _nowhere([ENV_SECRET], out, run)


def test_wandb_run_metadata_holds_no_secret(tmp_path, synthetic_shards, monkeypatch):
    """wandb records the command line in its run metadata, which `wandb sync` uploads."""
    from lifecycle.stages.pretrain import run as fit

    import wandb

    wandb.init(mode="offline", dir=str(tmp_path / "earlier"))  # a run left open, as an earlier stage's is
    monkeypatch.setenv("HF_TOKEN", ENV_SECRET)
    monkeypatch.setattr(sys, "argv", ["lifecycle", "logger=wandb", f"data.shards=/data/{ENV_SECRET}"])
    fit(compose_cfg(tmp_path, "logger=wandb", "trainer.max_steps=1", "data.num_workers=0", "stage.validation.num_steps=1",
                    "stage.validation.prompts.n=1", "stage.validation.best=null", "stage.validation.metrics=false",
                    "trainer.enable_progress_bar=false",
                    "stage.curriculum=[{name:a,resolution:16,frames:8,batch_size:2,steps:1}]", shards=synthetic_shards))
    wandb.finish()  # flushes the run's records
    records = list((tmp_path / "wandb").rglob("run-*.wandb"))  # offline: the metadata is a record in this file
    assert len(records) == 1 and f"data.shards=/data/{MARKER}".encode() in records[0].read_bytes()
    for path in (tmp_path / "wandb").rglob("*"):
        if path.is_file():
            assert ENV_SECRET.encode() not in path.read_bytes(), path
    assert sys.argv[-1] == f"data.shards=/data/{ENV_SECRET}"  # restored: launchers re-run the command line as typed


def test_resuming_a_tampered_checkpoint_runs_none_of_its_code(tmp_path, synthetic_shards):
    from lifecycle.stages.pretrain import run as fit

    marker = tmp_path / "code-ran"
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 2, "state_dict": {}, "payload": CreatesFile(marker)}, tmp_path / "checkpoints" / "last.ckpt")
    cfg = compose_cfg(tmp_path, "trainer.resume=last", "data.num_workers=0", shards=synthetic_shards)
    with pytest.raises(Exception, match="Weights only load failed"):
        fit(cfg)
    assert not marker.exists()
