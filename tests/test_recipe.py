"""Recipe rules: YAML parsing, cross-field validation, overrides, derived values, DeepSpeed config."""

import json
import math
from pathlib import Path

import pytest

from dvtrain.recipe import (
    RECIPE_PATHS,
    RecipeError,
    derive,
    dump_recipe,
    load_recipe,
    nearest_multiples,
    parse_yaml,
    precision_advice,
    recipe_from_dict,
    resolve_ds_config,
)

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- YAML quirks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("1e-4", 0.0001), ("2.0e-04", 0.0002), ("1E5", 100000.0), ("-3e2", -300.0), (".5", 0.5), ("7", 7)],
)
def test_yaml12_numbers(text, expected):
    value = parse_yaml(f"v: {text}")["v"]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["off", "on", "yes", "no", "y", "n"])
def test_yaml11_booleans_stay_strings(text):
    assert parse_yaml(f"v: {text}")["v"] == text


def test_lr_1e4_is_float_in_recipe(tmp_path):
    r = load_recipe(write(tmp_path, "optim:\n  base_lr: 1e-4\n"))
    assert r.optim.base_lr == 0.0001 and isinstance(r.optim.base_lr, float)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "model:\n  arch: vit_small\n  patch_size: [14\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert str(p) in msg and "line 4" in msg and "YAML syntax error" in msg


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_not_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="mapping of sections, got list"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


# ---- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, patch, expected", [(96, 14, [98]), (320, 14, [308, 322]), (97, 16, [96]), (10, 14, [14])]
)
def test_nearest_multiples(size, patch, expected):
    assert nearest_multiples(size, patch) == expected


def test_crop_size_messages(tmp_path):
    p = write(tmp_path, "model:\n  patch_size: 14\ncrops:\n  global_size: 320\n  local_size: 96\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    assert exc.value.problems == [
        f"{p}: crops.global_size=320 is not a multiple of model.patch_size=14: use 308 or 322",
        f"{p}: crops.local_size=96 is not a multiple of model.patch_size=14: use 98",
    ]


def test_crop_224_passes():
    r = recipe_from_dict({"model": {"patch_size": 14}, "crops": {"global_size": 224, "local_size": 98}})
    assert r.crops.global_size == 224


def test_unknown_field_lists_close_matches(tmp_path):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, "optim:\n  base_lrr: 0.1\n"))
    assert exc.value.problems == [f"{tmp_path / 'r.yaml'}: optim.base_lrr: unknown field (did you mean optim.base_lr?)"]


def test_wrong_type_names_field(tmp_path):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, "batch:\n  micro_batch_per_device: many\n"))
    (msg,) = exc.value.problems
    assert "batch.micro_batch_per_device" in msg and "'many'" in msg


def test_koleo_needs_two_images_per_rank():
    with pytest.raises(RecipeError, match=r"micro_batch_per_device=1: KoLeo needs a nearest neighbour"):
        recipe_from_dict({"batch": {"micro_batch_per_device": 1}})
    assert recipe_from_dict({"batch": {"micro_batch_per_device": 1}, "loss": {"koleo_weight": 0}})


def test_warmups_must_end_within_the_run():
    """One rule for both warmups: the lr warmup and the teacher-temperature warmup."""
    for section, key in (("optim", "warmup_epochs"), ("teacher", "temp_warmup_epochs")):
        with pytest.raises(RecipeError) as exc:
            recipe_from_dict({"schedule": {"epochs": 40}, section: {key: 50}})  # defaults: 10 and 30 epochs
        (msg,) = exc.value.problems
        assert msg.endswith(f"{section}.{key}=50.0 exceeds schedule.epochs=40.0: a warmup must end within the "
                            f"run, use {section}.{key} <= 40.0"), msg
        assert recipe_from_dict({"schedule": {"epochs": 40}, section: {key: 40}})  # ending at the last step is fine


def test_precision_advice():
    fp16, bf16 = recipe_from_dict({"precision": "fp16"}), recipe_from_dict({"precision": "bf16"})
    advice = precision_advice(fp16, cuda_available=False)
    assert advice.startswith("precision=fp16 without a CUDA device") and "--set precision=bf16" in advice
    assert "skipping" in advice
    assert precision_advice(fp16, cuda_available=True) is None
    assert precision_advice(bf16, cuda_available=False) is None
    assert precision_advice(bf16, cuda_available=True, cuda_bf16=True) is None
    assert "--set precision=fp16" in precision_advice(bf16, cuda_available=True, cuda_bf16=False)
    assert precision_advice(recipe_from_dict({"precision": "fp32"}), cuda_available=False) is None
    shipped = load_recipe(REPO / "recipes/vits14.yaml")  # the shipped GPU recipes are fp16
    assert shipped.precision == "fp16" and precision_advice(shipped, cuda_available=False) == advice


def test_every_problem_reported():
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(
            {"teacher": {"momentum_start": 0.999, "momentum_end": 0.99}, "optim": {"warmup_epochs": 200}}
        )
    assert len(exc.value.problems) == 2


# ---- overrides --------------------------------------------------------------------------------------


def test_overrides_parse_yaml_values(tmp_path):
    p = write(tmp_path, "model:\n  arch: vit_small\n")
    r = load_recipe(p, ["optim.base_lr=2e-4", "model.arch=vit_base", "wandb.tags=[a, b]", "precision=bf16"])
    assert r.optim.base_lr == 0.0002 and r.model.arch == "vit_base"
    assert r.wandb.tags == ["a", "b"] and r.precision == "bf16"


def test_override_unknown_path(tmp_path):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write(tmp_path, ""), ["optim.baselr=1"])
    assert exc.value.problems == ["--set optim.baselr: unknown recipe field; did you mean optim.base_lr?"]


def test_override_validated_like_file(tmp_path):
    with pytest.raises(RecipeError, match="crops.local_size=96 .* use 98"):
        load_recipe(write(tmp_path, ""), ["crops.local_size=96"])


def test_override_without_equals(tmp_path):
    with pytest.raises(RecipeError, match="expected dotted.path=value"):
        load_recipe(write(tmp_path, ""), ["optim.base_lr"])


def test_dump_roundtrip(tmp_path):
    r = load_recipe(REPO / "recipes" / "vitg14.yaml")
    again = load_recipe(write(tmp_path, dump_recipe(r)))
    assert again == r


def test_field_paths_cover_sections():
    assert "optim.base_lr" in RECIPE_PATHS and "zero.stage" in RECIPE_PATHS and "seed" in RECIPE_PATHS


# ---- shipped recipes and derived values -------------------------------------------------------------


def test_recipes_shipped():
    names = {p.stem for p in RECIPES}
    assert {"smoke_cpu", "vits14", "vitb14", "vitl14", "vitg14"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    r = load_recipe(path)
    resolve_ds_config(r, 1)


# (recipe, world size) -> (global batch, scaled lr, total iterations); lr = base * sqrt(batch / 1024)
EXPECTED = {
    ("vits14", 1): (64, 0.004 * 0.25, 125000),
    ("vits14", 16): (1024, 0.004, 125000),
    ("vitb14", 8): (512, 0.004 * math.sqrt(0.5), 125000),
    ("vitl14", 32): (1024, 2e-4, 625000),
    ("vitl14", 1): (32, 2e-4 * math.sqrt(32 / 1024), 625000),
    ("vitg14", 8): (96, 2e-4 * math.sqrt(96 / 1024), 625000),
    ("vitg14", 1): (12, 2e-4 * math.sqrt(12 / 1024), 625000),
    ("smoke_cpu", 1): (64, 0.002 * 0.25, 450),
    ("smoke_cpu", 2): (128, 0.002 * math.sqrt(128 / 1024), 450),
}


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: f"{k[0]}-w{k[1]}")
def test_derived_values(key):
    name, world = key
    d = derive(load_recipe(REPO / "recipes" / f"{name}.yaml"), world)
    gb, lr, iters = EXPECTED[key]
    assert d.global_batch == gb
    assert d.lr == pytest.approx(lr, rel=1e-12)
    assert d.total_iterations == iters


def test_vitg14_is_the_reference_recipe():
    r = load_recipe(REPO / "recipes" / "vitg14.yaml")
    assert (r.model.arch, r.model.patch_size, r.model.ffn_layer) == ("vit_giant2", 14, "swiglu")
    assert (r.loss.centering, r.loss.num_prototypes, r.loss.bottleneck_dim) == ("sinkhorn_knopp", 131072, 384)
    assert r.loss.ibot_separate_head and r.batch.micro_batch_per_device == 12
    assert (r.optim.base_lr, r.optim.warmup_epochs, r.optim.weight_decay_end, r.optim.layerwise_decay) == (
        2e-4, 80, 0.2, 1.0)
    assert (r.teacher.momentum_start, r.model.drop_path_rate) == (0.994, 0.4)
    assert (r.schedule.epochs, r.schedule.iterations_per_epoch, r.precision, r.zero.stage) == (500, 1250, "fp16", 3)
    d = derive(r, 1)
    assert (d.warmup_iterations, d.freeze_last_layer_iterations, d.teacher_temp_warmup_iterations) == (
        100000, 1250, 37500)


# ---- DeepSpeed config ---------------------------------------------------------------------------------


def test_ds_config_filled_from_recipe():
    r = load_recipe(REPO / "recipes" / "vitg14.yaml", ["batch.grad_accum_steps=2"])
    cfg = resolve_ds_config(r, 4)
    assert cfg["train_micro_batch_size_per_gpu"] == 12
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 12 * 2 * 4
    assert cfg["fp16"]["enabled"] is True and cfg["fp16"]["initial_scale_power"] == 16
    assert cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 3


def test_ds_config_bf16_and_stage2():
    r = load_recipe(REPO / "recipes" / "vits14.yaml", ["precision=bf16", "zero.stage=2", "optim.clip_mode=global"])
    cfg = resolve_ds_config(r, 1)
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"]["stage"] == 2
    assert not any(k.startswith("stage3_") for k in cfg["zero_optimization"])
    assert cfg["gradient_clipping"] == 3.0
    per_module = load_recipe(REPO / "recipes" / "vits14.yaml", ["precision=bf16"])
    assert resolve_ds_config(per_module, 1)["gradient_clipping"] == 0.0  # dvtrain clips per module


def test_per_module_clipping_needs_zero3():
    with pytest.raises(RecipeError, match="optim.clip_mode=per_module needs zero.stage=3 .* use optim.clip_mode=global"):
        recipe_from_dict({"zero": {"stage": 2}})
    assert recipe_from_dict({"zero": {"stage": 2}, "optim": {"clip_mode": "global"}}).zero.stage == 2


def test_ds_config_offload():
    r = load_recipe(REPO / "recipes" / "vits14.yaml", ["zero.offload=cpu", "optim.clip_mode=global"])
    cfg = resolve_ds_config(r, 1)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_ds_template_must_not_duplicate_recipe_values(tmp_path):
    tmpl = tmp_path / "t.json"
    tmpl.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    r = recipe_from_dict({"zero": {"config": str(tmpl)}})
    with pytest.raises(RecipeError) as exc:
        resolve_ds_config(r, 1)
    assert len(exc.value.problems) == 2
    assert "'train_micro_batch_size_per_gpu' is set by the recipe (batch.micro_batch_per_device)" in str(exc.value)


def test_shipped_ds_templates_are_valid():
    for tmpl in sorted((REPO / "ds_configs").glob("*.json")):
        r = recipe_from_dict({"zero": {"config": str(tmpl)}, "optim": {"clip_mode": "global"}})
        assert resolve_ds_config(r, 2)["train_batch_size"] == 128
