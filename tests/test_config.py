import pytest

from distill_pipe.config import ConfigError, TrainConfig, config_from_dict, load_config

from conftest import REPO


def test_repository_params_load():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.teacher.model == "builtin:smollm2-135m"
    assert cfg.data.source == "builtin:pydoc"
    assert set(cfg.students) >= {"kd20", "ce20"}
    assert cfg.students["ce20"].train.alpha == 1.0
    # a student inherits every train default it does not override
    assert cfg.students["kd20"].train.learning_rate == cfg.train.learning_rate


def test_overrides_parse_yaml_scalars_and_lists(tmp_path):
    cfg = load_config(REPO / "params.yaml", ["data.seq_len=64", "teacher_logits.codec_params={step: 0.125}",
                                              "students.kd20.init.from_teacher={layers: [0, 2, 29]}",
                                              "students.kd20.alpha=0.25", "train.max_steps=null"])
    assert cfg.data.seq_len == 64
    assert cfg.teacher_logits.codec_params == {"step": 0.125}
    assert cfg.students["kd20"].init == {"from_teacher": {"layers": [0, 2, 29]}}
    assert cfg.students["kd20"].train.alpha == 0.25
    assert cfg.train.max_steps is None


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=1", "data.seq_len must be >= 2, got 1"),
    ("data.sequence_length=4", "unknown key data.sequence_length"),
    ("dat.seq_len=4", "unknown section 'dat'"),
    ("data.seq_len=abc", "data.seq_len must be int, got 'abc'"),
    ("data.validation_fraction=1.0", "data.validation_fraction must be in (0, 1), got 1.0"),
    ("data.validation_fraction=0", "data.validation_fraction must be in (0, 1), got 0"),
    ("train.alpha=1.5", "train.alpha must be in [0, 1], got 1.5"),
    ("train.temperature=0", "train.temperature must be > 0, got 0"),
    ("train.loss_chunk_size=0", "train.loss_chunk_size must be null (auto) or >= 1, got 0"),
    ("students.kd20.temperature=-1", "students.kd20.temperature must be > 0, got -1"),
    ("students.kd20.learning_rat=1", "unknown key students.kd20.learning_rat"),
    ("teacher.dtype=float8", "teacher.dtype must be float32 or bfloat16"),
    ("teacher_logits.codec=zip", "teacher_logits.codec must be one of"),
    ("seq_len", "must look like section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "params.yaml", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_student_init_is_checked():
    with pytest.raises(ConfigError, match="students.s.init must be a mapping with exactly one of"):
        config_from_dict({"students": {"s": {"init": {"from_scratch": {}}}}})
    with pytest.raises(ConfigError, match=r"students.s.init.from_teacher must be"):
        config_from_dict({"students": {"s": {"init": {"from_teacher": {"num_layers": 0}}}}})


def test_missing_params_file_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_exponent_floats_are_numbers_on_the_command_line_and_in_files(tmp_path):
    cfg = load_config(REPO / "params.yaml", ["train.learning_rate=3e-4", "teacher_logits.codec_params={tail_mass: 1e-3}"])
    assert cfg.train.learning_rate == 3e-4
    assert cfg.teacher_logits.codec_params == {"tail_mass": 1e-3}
    (tmp_path / "p.yaml").write_text("train:\n  learning_rate: 5e-5\n")
    assert load_config(tmp_path / "p.yaml").train.learning_rate == 5e-5


def test_float_fields_accept_ints():
    assert config_from_dict({"train": {"learning_rate": 1}}).train.learning_rate == 1.0
    assert isinstance(TrainConfig().temperature, float)


def test_codec_examples_in_the_field_docs_are_valid():
    """Every `codec: {params}` example in config.py's field docs builds that codec."""
    import re

    import yaml

    from distill_pipe.store.codecs import CODECS, make_codec

    source = (REPO / "distill_pipe" / "config.py").read_text()
    examples = [(name, yaml.safe_load(params)) for name, params in re.findall(r"([a-z0-9-]+): (\{[^}]*\})", source)
                if name in CODECS]
    assert examples, "no codec example found in config.py"
    for name, params in examples:
        make_codec(name, **params)


def test_installed_torch_is_in_the_declared_range_and_has_fsdp2_sum_reduction():
    """pyproject's torch floor is the tested release; the trainer's FSDP2 calls exist in it."""
    import tomllib

    import torch
    from packaging.requirements import Requirement
    from packaging.version import Version
    from torch.distributed.fsdp import FSDPModule

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert Version(torch.__version__.split("+")[0]) in req.specifier
    assert hasattr(FSDPModule, "set_gradient_divide_factor") and hasattr(FSDPModule, "set_force_sum_reduction_for_comms")
