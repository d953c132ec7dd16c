"""icd-run's configuration: the pipeline section over its base and --set, --repeat and the
segment sources; the whole configuration is checked before the first step, each error naming
the file and key (or the flag) that gave the bad value; one YAML reader (base: chains, keys
given twice) serves icd-run and the training commands."""
import os

import pytest

from icd.config import load_config, read_config_file
from icd.pipeline import (paper, sections as pipeline_sections, settings as pipeline_settings,
                          superpixels as superpixel_step)

from helpers import icd_run, last_error, run_config


def test_pipeline_section_merges_its_base_and_set_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: vgg16_icd\npipeline:\n  cam: {model: vgg16_cam}\n"
                    "  seeds: {rows: [nocrf, crf]}\n  gt_root: gt\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nlearning_rate: 0.01\npipeline:\n  seeds: {rows: [crf]}\n")
    section = read_config_file(str(child)).pipeline
    assert section == {"cam": {"model": "vgg16_cam"}, "seeds": {"rows": ["crf"]},
                       "gt_root": "gt"}
    settings = pipeline_settings.PaperSettings(str(child), str(tmp_path / "out"),
                                   sets=pipeline_sections.parse_sets(["train.num_epoch=3",
                                                          "cam.learning_rate=0.5",
                                                          "seeds.rows=[nocrf]"]))
    assert settings.icd.learning_rate == 0.01 and settings.icd.num_epoch == 3
    assert settings.cam.model == "vgg16_cam" and settings.cam.learning_rate == 0.5
    assert settings.cam.num_epoch == 3 and settings.pipeline.seeds.rows == ("nocrf",)
    assert settings.icd.snapshot == str(tmp_path / "out" / "snapshot_icd")
    with pytest.raises(ValueError, match="--set: unknown stage 'sedes'"):
        pipeline_settings.PaperSettings(str(child), "o", sets=pipeline_sections.parse_sets(["sedes.rows=[crf]"]))
    with pytest.raises(ValueError, match=r"--set: seeds: unknown keys \['crf'\]"):
        pipeline_settings.PaperSettings(str(child), "o", sets=pipeline_sections.parse_sets(["seeds.crf=false"]))
    with pytest.raises(ValueError, match="--set: expected stage.key=value"):
        pipeline_sections.parse_sets(["rows=[crf]"])


def test_repeat_runs_the_steps_after_superpixels_per_training_seed(tiny_voc, tmp_path):
    settings = pipeline_settings.PaperSettings(run_config(tmp_path, tiny_voc, 2), str(tmp_path), repeat=2)
    names = [s.name for s in paper.paper_steps(settings)]
    assert names == ["superpixels"] + [f"{b}.s{k}" for k in (0, 1) for b in (
        "train_icd", "train_cam", "infer", "seeds", "evaluate", "segment", "tables")] + \
        ["compare"]
    assert settings.training("icd", 1).seed == 1
    assert settings.training("icd", 1).snapshot == str(tmp_path / "seed1" / "snapshot_icd")
    assert paper.select(paper.paper_steps(settings), ["train"]) == \
        ["train_icd.s0", "train_cam.s0", "train_icd.s1", "train_cam.s1"]


def test_segment_labels_train_deeplab_on_each_source_in_its_own_folders(tiny_voc, tmp_path):
    config = run_config(tmp_path, tiny_voc, 2)
    val = tiny_voc["data_list"].replace("train.txt", "val.txt")
    sets = ["segment.config=synthetic_deeplab.yaml", f"segment.list={val}",
            f"run.splits={{train: {tiny_voc['data_list']}, val: {val}}}"]
    one = pipeline_settings.PaperSettings(config, str(tmp_path / "one"), sets=pipeline_sections.parse_sets(sets))
    assert one.segmentation_dirs(0, "icd") == (str(tmp_path / "one" / "snapshot_segment"),
                                               str(tmp_path / "one" / "segmentation"))
    assert one.segmentation(0).label_root == os.path.join(one.results(0, "icd", "train"),
                                                          "seeds", "crf")
    # superpixels for the training list and every split's (val's scores are refined by them)
    assert superpixel_step.superpixel_lists(one) == [tiny_voc["data_list"], val]
    three = pipeline_settings.PaperSettings(config, str(tmp_path / "three"), sets=pipeline_sections.parse_sets(
        sets + ["segment.labels=[icd, cam, gt]", "segment.width=0.25"]))
    out = str(tmp_path / "three")
    assert three.segmentation(0, "cam").label_root == os.path.join(
        three.results(0, "cam", "train"), "seeds", "crf_cam")
    assert three.segmentation(0, "gt").label_root == tiny_voc["gt_root"]
    assert three.segmentation(0, "gt").snapshot == os.path.join(out, "snapshot_segment_gt")
    assert three.segmentation(0, "gt").width == 0.25
    assert three.segmentation_dirs(0, "cam")[1] == os.path.join(out, "segmentation", "cam")
    segment = {s.name: s for s in paper.paper_steps(three)}["segment"]
    assert set(segment.settings) >= {"icd", "cam", "gt"} and len(segment.folders) == 4
    with pytest.raises(ValueError, match="--set segment.labels: cam needs the baseline"):
        pipeline_settings.PaperSettings(config, out, sets=pipeline_sections.parse_sets(
            sets + ["segment.labels=[cam]", "run.cam=null"]))


# ---------------------------------------------------------------------------------------------
# Checked before the first step

def _with(config, text):
    """`config` with `text` added before its pipeline: section."""
    with open(config) as f:
        lines = f.read()
    with open(config, "w") as f:
        f.write(lines.replace("pipeline:\n", text + "pipeline:\n", 1))
    return config


@pytest.mark.parametrize("key, value", [("top_down", "z"), ("optimizer", "adamw"),
                                        ("bottom_up_loss", "foo"), ("model", "nonexistent"),
                                        ("amp", "fp32")])
def test_a_bad_choice_in_the_yaml_is_named_by_file_and_key_before_any_step(
        tiny_voc, tmp_path, capsys, key, value):
    config = _with(run_config(tmp_path, tiny_voc, 1), f"{key}: {value}\n")
    out = str(tmp_path / "out")
    assert icd_run(config, out) == 1
    error = last_error(capsys)
    assert error.startswith(f"error: {config}: {key}: must be one of "), error
    assert repr(value) in error and "--" not in error
    assert not os.path.exists(os.path.join(out, "superpixels"))
    assert not os.path.exists(os.path.join(out, "steps", "superpixels.json"))


def test_load_config_enforces_choices_naming_the_file_of_the_base_chain(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("amp: fp32\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nseed: 3\n")
    with pytest.raises(ValueError, match=rf"^{base}: amp: must be one of off, bf16, fp16, "
                                         rf"got 'fp32'$"):
        load_config(str(child))
    base.write_text("top_down: z\n")
    with pytest.raises(ValueError, match=rf"^{base}: top_down: must be one of a, b, c, d"):
        load_config(str(child))


def test_a_set_override_is_named_as_given(tiny_voc, tmp_path, capsys):
    config = run_config(tmp_path, tiny_voc, 1)
    assert icd_run(config, str(tmp_path / "out"), "--set", "train.width=abc") == 1
    assert last_error(capsys) == "error: --set train.width: must be a number, got 'abc'"
    assert icd_run(config, str(tmp_path / "out"), "--set", "cam.top_down=q") == 1
    assert last_error(capsys) == ("error: --set cam.top_down: must be one of a, b, c, d, got 'q'")


def test_a_key_given_twice_in_one_yaml_names_file_key_and_both_lines(tiny_voc, tmp_path,
                                                                     capsys):
    config = _with(run_config(tmp_path, tiny_voc, 1), "learning_rate: 0.1\n")
    with open(config) as f:
        lines = f.read().splitlines()
    first = lines.index("learning_rate: 0.1") + 1
    with open(config, "a") as f:
        f.write("learning_rate: 0.5\n")
    assert icd_run(config, str(tmp_path / "out")) == 1
    assert last_error(capsys) == (f"error: {config}: learning_rate: given twice, on lines {first} "
                                  f"and {len(lines) + 1}; keep one")
    nested = tmp_path / "nested.yaml"
    nested.write_text("pipeline:\n  seeds: {rows: [crf]}\n  gt_root: a\n  gt_root: b\n")
    with pytest.raises(ValueError, match=rf"^{nested}: gt_root: given twice, on lines 3 and 4"):
        read_config_file(str(nested)).pipeline


def test_a_base_cycle_in_an_icd_run_config_is_named(tmp_path, capsys):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("base: two.yaml\npipeline:\n  gt_root: gt\n")
    two.write_text("base: one.yaml\n")
    assert icd_run(str(one), str(tmp_path / "out")) == 1
    error = last_error(capsys)
    assert error.startswith(f"error: {two}: base 'one.yaml' includes {one} again"), error


def test_pipeline_keys_are_checked_naming_the_file_that_gave_them(tiny_voc, tmp_path, capsys):
    config = run_config(tmp_path, tiny_voc, 1)
    text = open(config).read()
    for bad, expected in (
            ("  seeds: {rows: [nocrf, crf]}\n", "  seeds: {rowz: [crf]}\n"),
            ("  seeds: {rows: [nocrf, crf]}\n", "  superpixels: {features: grey}\n"),
            ("  evaluate: {thresholds: [0.0, 0.3]}\n", "  evaluate: {thresholds: [3]}\n")):
        with open(config, "w") as f:
            f.write(text.replace(bad, expected))
        assert icd_run(config, str(tmp_path / "out")) == 1
        error = last_error(capsys)
        key = expected.split(":")[0].strip() + ": " + expected.split("{")[1].split(":")[0]
        assert error.startswith(f"error: {config}: pipeline: {key}: "), error


def test_a_missing_gt_root_is_named_before_the_first_step(tiny_voc, tmp_path, capsys):
    config = run_config(tmp_path, tiny_voc, 1)
    with open(config) as f:
        text = f.read()
    missing = str(tmp_path / "no_such_gt")
    with open(config, "w") as f:
        f.write(text.replace(f"gt_root: {tiny_voc['gt_root']}", f"gt_root: {missing}"))
    out = str(tmp_path / "out")
    assert icd_run(config, out) == 1
    assert last_error(capsys) == (
        f"error: 1 input of the run not found (every input: docs/inputs.md): [1] {config}: "
        f"pipeline: gt_root: {missing}; get it: label maps <name>.png (VOC: SBD's "
        f"SegmentationClassAug; docs/inputs.md)")
    assert not os.path.exists(os.path.join(out, "superpixels"))
    # a step that does not read it runs (the superpixels read only the images and lists)
    settings = pipeline_settings.PaperSettings(config, out)
    settings.check_paths({"superpixels"})
    with pytest.raises(FileNotFoundError, match="pipeline: gt_root"):
        settings.check_paths({"evaluate"})


def test_fp16_on_cpus_is_refused_before_the_superpixels(tiny_voc, tmp_path, capsys):
    config, out = run_config(tmp_path, tiny_voc, 1), str(tmp_path / "out")
    assert icd_run(config, out, "--amp", "fp16") == 1
    error = last_error(capsys)
    assert error.startswith("error: --amp: fp16 cannot run on these devices: float16 needs "
                            "GPUs"), error
    assert not os.path.exists(os.path.join(out, "superpixels"))


@pytest.mark.parametrize("old, new, key", [
    ("  segment: {config: null}\n", "  segment: {config: nowhere.yaml}\n", "segment: config"),
    ("pipeline:\n", "pipeline:\n  cam: nowhere.yaml\n", "cam")])
def test_a_missing_stage_config_names_the_setting(tiny_voc, tmp_path, capsys, old, new, key):
    config = run_config(tmp_path, tiny_voc, 1)
    text = open(config).read()
    with open(config, "w") as f:
        f.write(text.replace(old, new, 1))
    assert icd_run(config, str(tmp_path / "out")) == 1
    assert last_error(capsys).startswith(f"error: {config}: pipeline: {key}: ")


def test_every_missing_input_is_named_at_once_with_how_to_get_it(tiny_voc, tmp_path, capsys):
    """Three inputs missing: one error before the first step names them all, each with its
    setting and the command or source that makes it (the ImageNet file: icd-pretrained, to the
    path the config gives)."""
    config = run_config(tmp_path, tiny_voc, 1)
    images, gt, weights = (str(tmp_path / n) for n in ("no_images", "no_gt", "vgg16_20M.params"))
    with open(config) as f:
        text = f.read().replace(f"image_root: {tiny_voc['image_root']}", f"image_root: {images}")
    with open(config, "w") as f:
        f.write(text.replace(f"gt_root: {tiny_voc['gt_root']}", f"gt_root: {gt}")
                + f"pretrained: {weights}\n")
    out = str(tmp_path / "out")
    assert icd_run(config, out) == 1
    error = last_error(capsys)
    head, *items = error.split(" [")
    assert head == "error: 3 inputs of the run not found (every input: docs/inputs.md):"
    assert items[0].startswith(f"1] {config}: image_root: {images}; get it: the images <name>.jpg")
    assert items[1] == (f"2] {config}: pretrained: {weights}; get it: icd-pretrained --from "
                        f"modelzoo:vgg16 --out {weights} (or the release's file: docs/inputs.md)")
    assert items[2].startswith(f"3] {config}: pipeline: gt_root: {gt}; get it: label maps")
    assert not os.path.exists(os.path.join(out, "superpixels"))
