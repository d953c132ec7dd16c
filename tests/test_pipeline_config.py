"""The typed `pipeline:` section of icd-run (icd.pipeline.sections): every stage's section is a
dataclass of fields declared once with help, choices and range; a bad choice, a value out of
range, a wrong type or an unknown key is refused when the config loads, naming the YAML file
(the one of the `base:` chain that gave it) and the key, or the --set item."""
import dataclasses

import pytest

from icd import config as config_module
from icd.data.dataset import DataPaths
from icd.pipeline import sections
from icd.pipeline.sections import PipelineConfig, load_pipeline, parse_sets
from icd.pipeline.settings import PaperSettings

# (stage, YAML mapping of the stage or value of a top key, --set item, key named, problem)
BAD = [
    ("seeds", "{rows: [foo]}", "seeds.rows=[foo]", "seeds: rows",
     "must be one of bu, bu_sp, nocrf, crf, got 'foo'"),
    ("seeds", "{rows: crf}", "seeds.rows=crf", "seeds: rows", "must be a list, got 'crf'"),
    ("superpixels", "{features: x}", "superpixels.features=x", "superpixels: features",
     "must be one of pretrained, colour, got 'x'"),
    ("repeat", "0", "run.repeat=0", "repeat", "must be positive, got 0"),
    ("repeat", "1.5", "run.repeat=1.5", "repeat", "must be an integer, got 1.5"),
    ("evaluate", "{thresholds: [0.5, 1.5]}", "evaluate.thresholds=[0.5, 1.5]",
     "evaluate: thresholds", "must be in [0, 1], got 1.5"),
    ("evaluate", "{thresholds: [a]}", "evaluate.thresholds=[a]", "evaluate: thresholds",
     "must be a number, got 'a'"),
    ("segment", "{labels: [icd, sam]}", "segment.labels=[icd, sam]", "segment: labels",
     "must be one of icd, cam, gt, got 'sam'"),
    ("segment", "{seeds: bogus}", "segment.seeds=bogus", "segment: seeds",
     "must be one of bu, bu_sp, nocrf, crf, got 'bogus'"),
    ("gt_root", "''", "run.gt_root=''", "gt_root", "must be non-empty, got ''"),
    ("splits", "{train: 3}", "run.splits={train: 3}", "splits", "must be a string, got 3"),
    ("cam", "5", "run.cam=5", "cam", "must be a string or a mapping, got 5"),
]


def _yaml(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("stage, value, item, key, problem", BAD,
                         ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_a_bad_value_in_the_yaml_is_refused_naming_file_and_key(tmp_path, stage, value, item,
                                                                key, problem):
    config = _yaml(tmp_path, f"pipeline:\n  {stage}: {value}\n")
    with pytest.raises(ValueError) as error:
        PaperSettings(config, str(tmp_path / "out"))
    assert str(error.value) == f"{config}: pipeline: {key}: {problem}"


@pytest.mark.parametrize("stage, value, item, key, problem", BAD,
                         ids=[f"{b[0]}-{b[2]}" for b in BAD])
def test_a_bad_set_item_is_refused_naming_it(tmp_path, stage, value, item, key, problem):
    config = _yaml(tmp_path, "pipeline:\n  seeds: {rows: [crf]}\n")
    with pytest.raises(ValueError) as error:
        PaperSettings(config, str(tmp_path / "out"), sets=parse_sets([item]))
    name = item.split("=")[0]
    assert str(error.value) == f"--set {name}: {problem}"


@pytest.mark.parametrize("text, key", [
    ("  segment: {colour: red}\n", "segment: colour"),
    ("  infer: {size: 3}\n", "infer: size"),
    ("  seeds: {rows: [crf], crf: true}\n", "seeds: crf"),
    ("  reapeat: 2\n", "reapeat"),
])
def test_an_unknown_key_is_refused_naming_file_and_key(tmp_path, text, key):
    config = _yaml(tmp_path, "pipeline:\n" + text)
    with pytest.raises(ValueError, match=rf"^{config}: pipeline: {key}: unknown key; known: "):
        load_pipeline(config)
    stage, _, sub = key.partition(": ")
    if sub:
        with pytest.raises(ValueError, match=rf"^--set: {stage}: unknown keys \['{sub}'\]$"):
            load_pipeline(_yaml(tmp_path, "pipeline: {}\n", "empty.yaml"),
                          parse_sets([f"{stage}.{sub}=1"]))


def test_a_bad_value_is_named_by_the_file_of_the_base_chain_that_gave_it(tmp_path):
    base = _yaml(tmp_path, "pipeline:\n  seeds: {rows: [crf, foo]}\n  gt_root: gt\n",
                 "base.yaml")
    child = _yaml(tmp_path, "base: base.yaml\npipeline:\n  gt_root: other\n")
    with pytest.raises(ValueError, match=rf"^{base}: pipeline: seeds: rows: must be one of "):
        load_pipeline(child)
    with pytest.raises(ValueError, match=r"^--repeat: must be positive, got 0$"):
        load_pipeline(_yaml(tmp_path, "pipeline: {}\n", "plain.yaml"), repeat=0)
    cam = _yaml(tmp_path, "base: base.yaml\npipeline:\n  cam: {modle: x}\n"
                          "  seeds: {rows: [crf]}\n", "cam.yaml")
    with pytest.raises(ValueError, match=rf"^{cam}: pipeline: cam: \['modle'\]: not "
                                         r"training options"):
        load_pipeline(cam)


def test_the_sections_are_typed_and_read_the_base_chain_once(tmp_path, monkeypatch):
    base = _yaml(tmp_path, "pipeline:\n  seeds: {rows: [nocrf, crf]}\n"
                           "  evaluate: {thresholds: [0, 1]}\n"
                           "  segment: {config: deeplab.yaml, width: 0.25}\n", "base.yaml")
    child = _yaml(tmp_path, "base: base.yaml\npipeline:\n  seeds: {rows: [crf]}\n")
    chains = []
    read = config_module.read_yaml_chain
    monkeypatch.setattr(config_module, "read_yaml_chain",
                        lambda path, *a: chains.append(path) or read(path, *a))
    pipeline, origins = load_pipeline(child, parse_sets(["run.repeat=2", "segment.crf=true"]))
    assert chains == [child, base]                     # one walk of the base: chain
    assert isinstance(pipeline, PipelineConfig)
    assert pipeline.seeds.rows == ("crf",) and pipeline.evaluate.thresholds == (0.0, 1.0)
    assert pipeline.repeat == 2 and pipeline.segment.config == "deeplab.yaml"
    assert dict(pipeline.segment.deeplab) == {"width": 0.25, "crf": True}
    assert sections.section_settings(pipeline.segment)["width"] == 0.25
    assert origins.where("seeds.rows") == f"{child}: pipeline: seeds: rows"
    assert origins.where("evaluate.thresholds") == f"{base}: pipeline: evaluate: thresholds"
    assert origins.where("repeat") == "--set run.repeat"


def test_every_field_is_declared_once_with_its_help(tmp_path):
    for stage in (PipelineConfig, *sections.STAGES.values()):
        for spec in dataclasses.fields(stage):
            if spec.name not in sections.STAGES:
                assert spec.metadata["help"], (stage.__name__, spec.name)
    settings = PaperSettings(_yaml(tmp_path, "pipeline:\n  gt_root: gt\n"), str(tmp_path))
    assert settings.data == DataPaths(settings.icd.image_root, settings.icd.annotation_root,
                                      settings.icd.data_list, settings.icd.class_names, "gt")
