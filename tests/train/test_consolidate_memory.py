"""`--consolidate` of a ZeRO checkpoint builds the whole fp32 model in one process (issue 23): it is refused
up front, in one line naming the memory and the streamed alternative, when the node cannot hold it."""

import json

import pytest

from dive_ds.models.moe import count_parameters
from dive_ds.train.export import CONSOLIDATION_COPIES, check_consolidation_memory
from tests.fixtures.tiny import tiny_moe_config


@pytest.fixture
def tag_dir(tmp_path):
    tag = tmp_path / "run" / "stages" / "experts" / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "config.json").write_text(json.dumps(tiny_moe_config().to_dict()))
    return tag


def test_refused_when_the_fp32_model_does_not_fit(tag_dir):
    need = CONSOLIDATION_COPIES * 4 * count_parameters(tiny_moe_config())["total"]
    with pytest.raises(ValueError) as e:
        check_consolidation_memory(tag_dir, None, avail=need - 1)
    line = str(e.value)
    assert "\n" not in line and "builds the whole model in fp32" in line
    assert str(tag_dir.parent.parent / "model") in line and "dive-ds consolidate --shards" in line
    check_consolidation_memory(tag_dir, None, avail=need)  # exactly enough: goes ahead


def test_the_stage_input_config_serves_when_the_tag_has_none(tag_dir, tmp_path):
    source = tmp_path / "input"
    source.mkdir()
    (tag_dir / "config.json").rename(source / "config.json")
    with pytest.raises(ValueError, match="builds the whole model"):
        check_consolidation_memory(tag_dir, source, avail=1)
    check_consolidation_memory(tag_dir, None, avail=1)  # no config anywhere: nothing to estimate, no refusal
