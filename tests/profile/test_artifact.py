import json

import pytest
import torch

from ertacache.errors import ProfileError, UserError
from ertacache.profile.artifact import Profile, load_profile
from ertacache.profile.timeadjust import adjusted_sigmas
from ertacache.sampling.sigmas import nominal_sigmas


def make_profile(steps=8, model="wan2.1-tiny") -> Profile:
    nominal = nominal_sigmas(steps, 3.0)
    mask = [True, False, True, False, False, True, False, True][:steps]
    mask[-1] = True
    phi = [1.0 if m else 0.9 for m in mask]
    return Profile(
        model=model, model_fingerprint="abc123", steps=steps, shift=3.0, height=32, width=32, frames=8,
        latent_shape=[16, 8, 8, 8], guidance_scale=4.0, n_branches=2, lam=0.1, mask=mask,
        nominal_sigmas=nominal.tolist(), sigmas=adjusted_sigmas(nominal, phi).tolist(), phi=phi,
        corr_a=torch.randn(steps, 2, 16), corr_b=torch.randn(steps, 2, 16), config={"lam": 0.1},
        calibration={"num_prompts": 2}, stats={"residual_error": [0.0] * steps}, speedup_target=None,
    )


def test_round_trip_keeps_every_field(tmp_path):
    prof = make_profile()
    prof.save(tmp_path / "p")
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"profile.json", "correction.safetensors",
                                                            "error_profile.png"}
    back = load_profile(tmp_path / "p")
    for field in ("model", "model_fingerprint", "steps", "mask", "sigmas", "phi", "nominal_sigmas", "lam",
                  "height", "width", "frames", "latent_shape", "n_branches"):
        assert getattr(back, field) == getattr(prof, field), field
    torch.testing.assert_close(back.corr_a, prof.corr_a)
    torch.testing.assert_close(back.corr_b, prof.corr_b)
    meta = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert meta["schema_version"] == 1 and meta["sigmas"][-1] == 0.0 and len(meta["sigmas"]) == 9


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(model="wan2.1"), ["model", "wan2.1-tiny", "wan2.1"]),
        (dict(steps=30), ["steps", "8", "30"]),
        (dict(height=64), ["height", "32", "64"]),
        (dict(fingerprint="ffff"), ["fingerprint", "abc123", "ffff"]),
    ],
)
def test_refuses_other_model_steps_shape_naming_both_sides(kwargs, names):
    with pytest.raises(ProfileError) as err:
        make_profile().check_matches(**kwargs)
    for n in names:
        assert n in str(err.value)


def corrupt(path, name, data: bytes):
    (path / name).write_bytes(data)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: corrupt(p, "profile.json", (p / "profile.json").read_bytes()[:50]), "corrupt or truncated"),
        (lambda p: corrupt(p, "correction.safetensors", (p / "correction.safetensors").read_bytes()[:40]),
         "does not match the sha256"),
        (lambda p: (p / "correction.safetensors").unlink(), "missing"),
        (lambda p: (p / "profile.json").unlink(), "no profile.json"),
        (lambda p: _edit(p, lambda m: m.pop("sigmas")), "lacks the field 'sigmas'"),
        (lambda p: _edit(p, lambda m: m.update(schema_version=99)), "schema_version 99"),
        (lambda p: _edit(p, lambda m: m["mask"].pop()), "'mask' has 7 entries"),
        (lambda p: _edit(p, lambda m: m["sigmas"].__setitem__(-1, 0.01)), "end exactly at 0"),
        (lambda p: _edit(p, lambda m: m.update(steps="eight")), "wrong type"),
    ],
)
def test_damaged_profiles_are_refused_with_the_defect_named(tmp_path, damage, match):
    make_profile().save(tmp_path / "p")
    damage(tmp_path / "p")
    with pytest.raises(ProfileError, match=match):
        load_profile(tmp_path / "p")


def _edit(path, change):
    meta = json.loads((path / "profile.json").read_text())
    change(meta)
    (path / "profile.json").write_text(json.dumps(meta))


def test_missing_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(ProfileError, match="ertacache-profile"):
        load_profile(tmp_path / "nope")


def test_killed_save_leaves_no_half_profile_and_keeps_the_old_one(tmp_path, monkeypatch):
    make_profile().save(tmp_path / "p")
    before = (tmp_path / "p" / "profile.json").read_bytes()

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run was killed while plotting

    monkeypatch.setattr("ertacache.profile.plot.plot_profile", die)
    with pytest.raises(KeyboardInterrupt):
        make_profile(model="other").save(tmp_path / "p", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary folder left behind
    assert (tmp_path / "p" / "profile.json").read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        make_profile().save(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_existing_folder_needs_force(tmp_path):
    make_profile().save(tmp_path / "p")
    with pytest.raises(UserError, match="--force"):
        make_profile().save(tmp_path / "p")
    make_profile(model="x").save(tmp_path / "p", force=True)
    assert load_profile(tmp_path / "p").model == "x"

