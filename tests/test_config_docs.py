"""kl-ae config (every key with value, type and documentation), shipped configs by name, and the
README's "Your own data" commands followed from outside the clone."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from kl_ae.cli import main
from kl_ae.config import SHIPPED_CONFIGS, Config, load_config, shipped_configs
from kl_ae.config_docs import field_docs
from kl_ae.parsing import ConfigError
import helpers

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_config_key_is_documented():
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{section.name}: undocumented keys {missing}"


def test_config_prints_every_key_with_value_type_and_doc_and_loads_back(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the clone: the shipped config by name
    assert main(["config", "quickstart", "--set", "train.max_steps=5"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(text)
    cfg = load_config(tmp_path / "resolved.yaml")
    assert cfg == load_config(SHIPPED_CONFIGS / "quickstart.yaml", ["train.max_steps=5"])
    assert cfg.train.max_steps == 5
    lines = text.splitlines()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            i = next(n for n, line in enumerate(lines) if line.startswith(f"  {f.name}:"))
            comment = []
            while lines[i - 1].startswith("  #"):
                i -= 1
                comment.insert(0, lines[i])
            assert comment and comment[0].startswith(f"  # ({f.type})"), f.name  # the type, then the doc
    assert "  # (int) Optimizer steps" in text and "Default: 100000." in text  # changed from the default
    assert yaml.safe_load(text)["model"]["block_out_channels"] == [32, 64, 128, 128]


def test_shipped_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shipped = load_config(SHIPPED_CONFIGS / "sd-f8c4.yaml")
    for name in ("sd-f8c4", "sd-f8c4.yaml", "configs/sd-f8c4.yaml"):
        assert load_config(name) == shipped
    (tmp_path / "sd-f8c4.yaml").write_text("train:\n  max_steps: 3\n")  # a file of that name comes first
    assert load_config("sd-f8c4.yaml").train.max_steps == 3
    with pytest.raises(ConfigError, match="quickstart"):  # names the shipped ones
        load_config("quickstrat")
    assert main(["config", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in shipped_configs()) and len(shipped_configs()) >= 7


TINY = ["model.block_out_channels=[8,16]", "model.layers_per_block=1", "model.norm_num_groups=1",  # block_means: room for 3 colours
        "data.resolution=32", "data.val_resolution=32", "data.short_side_range=[]", "data.num_workers=0",
        "train.batch_size=2", "train.max_steps=2", "train.max_minutes=0", "train.mixed_precision=no",
        "train.tracker=none", "train.scaling_images=2", "train.checkpoint_every=1", "optim.lr_warmup_steps=0"]


def readme_commands(heading: str) -> list[list[str]]:
    """The kl-ae commands of the bash blocks under ``heading`` in the README, continuation lines
    joined, comments dropped."""
    section = re.split(r"\n##+ ", README.read_text().split(heading, 1)[1], maxsplit=1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words and words[0] == "kl-ae":
                commands.append(words[1:])
    return commands


@pytest.mark.slow
def test_the_readme_your_own_data_works_from_outside_the_clone(tmp_path, monkeypatch, capsys):
    """Each command as written, in an empty directory, with tiny-model --set items appended to the
    training commands; kl-ae shards prints the very data.train the README trains on."""
    commands = readme_commands("### Your own data")
    assert [c[0] for c in commands] == ["train", "export", "export", "eval", "shards", "train"]
    monkeypatch.chdir(tmp_path)
    helpers.write_noise_photos(tmp_path / "path/to/photos", 5, size=(48, 48))
    helpers.write_noise_photos(tmp_path / "path/to/val_photos", 2, size=(48, 48), seed=1)
    for words in commands:
        if "step-0001000" in " ".join(words):  # the README's example step: this run's first checkpoint
            words = [w.replace("step-0001000", "step-0000001") for w in words]
        extra = [a for item in TINY for a in ("--set", item)] if words[0] == "train" else []
        code = main(words + extra)
        out = capsys.readouterr().out
        assert code == 0, words
        if words[0] == "shards":
            pattern = next(w for w in commands[-1] if w.startswith("data.train=")).split("=", 1)[1]
            assert f"train on them with: --set data.train='{pattern}'" in out
    assert (tmp_path / "runs/mine-export/config.json").is_file() and (tmp_path / "runs/mine-1k/config.json").is_file()
    assert load_config(tmp_path / "runs/mine/config.yaml").data.val == "path/to/val_photos"
    assert (tmp_path / "runs/big/eval.json").is_file() and (tmp_path / "metrics.json").is_file()
