"""Config loading: YAML + dotted overrides, typed, with errors that name the key."""
import pytest

from megatron_jinpan.config import ConfigError, load_config
from megatron_jinpan.parallel.validate import validate_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: tiny, num_layers: 4}\nparallel: {tp: 2}\noptim: {lr: 3e-4}\nrun_dir: r\n")
    cfg = load_config(path, ["parallel.pp=2", "train.dtype=bf16", "model.tie_embeddings=true"])
    assert cfg.model.name == "tiny" and cfg.model.num_layers == 4 and cfg.model.hidden_size == 384
    assert cfg.model.tie_embeddings and cfg.parallel.tp == 2 and cfg.parallel.pp == 2
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.dtype == "bf16"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.name=tiny", "parallel.tp=2", "data.blend=[{path: a, weight: 1.0}]"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, words", [
    ("parallel.tpp=2", "parallel.tpp"),
    ("parallel.tp=two", "parallel.tp must be an integer"),
    ("train.dtype=fp8", "train.dtype"),
    ("model.name=huge", "model.name"),
    ("model.hidden=3", "model.hidden"),
    ("bogus.x=1", "bogus"),
    ("parallel.sp=maybe", "parallel.sp must be true or false"),
])
def test_bad_keys_and_types_name_the_key(override, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("overrides, world, words", [
    (["parallel.tp=3"], 3, "num_heads=4 is not divisible by parallel.tp=3"),
    (["parallel.tp=4"], 4, "num_kv_heads=2 is not divisible by parallel.tp=4"),
    (["parallel.pp=3"], 3, "num_layers=4 is not divisible"),
    (["train.global_batch=6", "train.micro_batch=4"], 1, "global_batch=6 is not divisible"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible"),
    (["parallel.pp=2", "parallel.pp_layers=[1,1]"], 2, "pp_layers sums to 2"),
    (["train.seq_len=4096"], 1, "exceeds model.max_seq_len"),
    (["parallel.virtual_stages=2"], 1, "needs parallel.pp_schedule=interleaved"),
])
def test_layout_errors_before_any_process_group(overrides, world, words):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("[", r"\[")):
        validate_config(cfg, world)
