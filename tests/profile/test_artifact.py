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
    torch.testing.assert_close(back.pred_w, prof.pred_w)
    torch.testing.assert_close(back.pred_b, prof.pred_b)
    assert back.predictor == prof.predictor and back.history == 1
    meta = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert meta["schema_version"] == 2 and meta["sigmas"][-1] == 0.0 and len(meta["sigmas"]) == 9


def _rewrite(folder, edit):
    """Apply ``edit`` to profile.json (keeping the correction file's hash valid)."""
    meta = json.loads((folder / "profile.json").read_text())
    edit(meta)
    (folder / "profile.json").write_text(json.dumps(meta))


def test_a_predictor_profile_round_trips_its_tables(tmp_path):
    prof = make_profile()
    prof.mask = [True, True, True, False, True, False, False, True]
    prof.pred_w = torch.randn(prof.steps, 3, 1)
    prof.pred_b = torch.randn(prof.steps, 32)
    prof.predictor = {"kind": "lagrange", "order": 2, "history": 3}
    prof.save(tmp_path / "p")
    back = load_profile(tmp_path / "p")
    assert back.history == 3 and back.predictor["kind"] == "lagrange"
    torch.testing.assert_close(back.tables().pred_w, prof.pred_w)
    torch.testing.assert_close(back.tables().pred_b, prof.pred_b)


def test_a_schema_1_profile_loads_as_the_reuse_predictor(tmp_path):
    """What a profile of the old schema meant (reuse the last residual) is what the new code reads."""
    from safetensors.torch import load_file, save_file

    from ertacache.io import sha256_file

    prof = make_profile()
    prof.save(tmp_path / "p")
    file = tmp_path / "p" / "correction.safetensors"
    old = {k: v for k, v in load_file(str(file)).items() if k in ("a", "b")}
    save_file(old, str(file))

    def to_v1(meta):
        meta["schema_version"] = 1
        meta.pop("predictor")
        meta["correction"]["sha256"] = sha256_file(file)

    _rewrite(tmp_path / "p", to_v1)
    back = load_profile(tmp_path / "p")
    assert back.history == 1 and back.tables().plain_reuse()
    assert back.predictor["migrated_from_schema"] == 1


def test_a_predictor_may_not_read_a_slot_before_a_full_step_fills_it(tmp_path):
    """A cached step after one full step may predict from it (weights [1, 0]), never from a second slot."""
    prof = make_profile()
    prof.mask = [True, False] + [True] * 6
    prof.predictor = {"kind": "taylor", "order": 1, "history": 2}
    prof.pred_w = torch.zeros(8, 2, 1)
    prof.pred_w[:, 0] = 1.0
    prof.save(tmp_path / "ok")
    assert load_profile(tmp_path / "ok").pred_w[1, :, 0].tolist() == [1.0, 0.0]
    prof.pred_w[1, :, 0] = torch.tensor([2.0, -1.0])  # a line through a residual that does not exist yet
    prof.save(tmp_path / "bad")
    with pytest.raises(ProfileError, match="step 1 is cached after 1 full step.*slot 2 of 2, which holds no residual"):
        load_profile(tmp_path / "bad")


def test_a_profile_of_a_future_schema_is_refused(tmp_path):
    """4 is the first unknown one (3: a two-expert profile; a one-expert profile marked 3 lacks its experts)."""
    make_profile().save(tmp_path / "p")
    _rewrite(tmp_path / "p", lambda meta: meta.update(schema_version=4))
    with pytest.raises(ProfileError, match="schema_version 4 is not one this ertacache reads"):
        load_profile(tmp_path / "p")


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



def _rehash_correction(path, edit_tables):
    """Rewrite correction.safetensors (and its sha256 in profile.json), as a broken calibration would."""
    from safetensors.torch import load_file, save_file

    from ertacache.io import sha256_file

    tables = load_file(str(path / "correction.safetensors"))
    edit_tables(tables)
    save_file(tables, str(path / "correction.safetensors"))
    _edit(path, lambda m: m["correction"].update(sha256=sha256_file(path / "correction.safetensors")))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: _rehash_correction(p, lambda t: t["a"][3].fill_(float("nan"))),
         r"correction table 'a' holds NaN or Inf \(first at step 3\)"),
        (lambda p: _rehash_correction(p, lambda t: t["b"][5, 1, 2:4].fill_(float("inf"))),
         r"correction table 'b' holds NaN or Inf \(first at step 5\)"),
        (lambda p: _rehash_correction(p, lambda t: t["a"].mul_(1e9)), r"beyond \+-10000"),
        (lambda p: _edit(p, lambda m: m.update(phi="0.9")), "field 'phi' has the wrong type"),
        (lambda p: _edit(p, lambda m: m.update(phi=[2.0] * 8)), r"'phi' must be numbers in \[0, 1.5\]"),
        (lambda p: _edit(p, lambda m: m.update(stats=[1, 2])), "'stats' must map names to lists"),
        (lambda p: _edit(p, lambda m: m.update(latent_shape=[])), "latent_shape must be 4 positive integers"),
        (lambda p: _edit(p, lambda m: m.update(calibration={"negative_prompt": 3})),
         "calibration.negative_prompt must be a string"),
        (lambda p: _edit(p, lambda m: m.update(guidance_scale=-5.0)), "guidance_scale must be a finite number >= 0"),
        (lambda p: _edit(p, lambda m: m.update(n_branches=1)), "n_branches 1 disagrees with guidance_scale 4.0"),
        (lambda p: _edit(p, lambda m: m.update(steps=10**8)), r"steps must be in \[1, 10000\]"),
        (lambda p: _edit(p, lambda m: m.update(speedup_target="fast")), "speedup_target must be null"),
        (lambda p: (p / "profile.json").write_text((p / "profile.json").read_text().replace('"lambda": 0.1',
                                                                                         '"lambda": Infinity')),
         "Infinity is not valid JSON"),
        (lambda p: (p / "profile.json").write_text("[" * 100_000 + "]" * 100_000), "corrupt or truncated"),
        (lambda p: _edit(p, lambda m: m.update(sigmas=[float(x) for x in m["sigmas"]][:-1] + [1e400 * 0])),
         "corrupt or truncated|finite|NaN"),
    ],
)
def test_profile_contents_are_checked_on_load(tmp_path, damage, match):
    make_profile().save(tmp_path / "p", plot=False)
    damage(tmp_path / "p")
    with pytest.raises(ProfileError, match=match) as err:
        load_profile(tmp_path / "p")
    assert len(str(err.value)) < 600  # a named defect, never an echo of the file


def test_a_profile_with_non_finite_values_cannot_be_saved(tmp_path):
    prof = make_profile()
    prof.lam = float("inf")
    with pytest.raises(ValueError):
        prof.save(tmp_path / "p", plot=False)
    assert not (tmp_path / "p").exists()


def test_force_never_replaces_something_that_is_not_a_profile(tmp_path):
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="is a file, not a profile folder"):
        make_profile().save(tmp_path / "notes.txt", force=True, plot=False)
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="is a folder but not a profile folder"):
        make_profile().save(tmp_path / "data", force=True, plot=False)
    assert (tmp_path / "notes.txt").read_text() == "keep" and (tmp_path / "data").is_dir()


def test_a_profile_written_before_the_guidance_mode_was_recorded_loads_as_cfg(tmp_path):
    make_profile().save(tmp_path / "p", plot=False)
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["guidance"] == "cfg"
    _edit(tmp_path / "p", lambda m: m.pop("guidance"))
    assert load_profile(tmp_path / "p").guidance == "cfg"


def test_an_image_family_profile_has_no_frames_and_a_3_axis_latent(tmp_path):
    prof = make_profile()
    prof.frames, prof.latent_shape = None, [16, 8, 8]
    prof.guidance, prof.guidance_scale, prof.n_branches = "embedded", 3.5, 1  # distilled guidance: one branch
    prof.corr_a, prof.corr_b = prof.corr_a[:, :1], prof.corr_b[:, :1]
    prof.save(tmp_path / "p", plot=False)
    back = load_profile(tmp_path / "p")
    assert (back.frames, back.latent_shape, back.guidance, back.n_branches) == (None, [16, 8, 8], "embedded", 1)
    _edit(tmp_path / "p", lambda m: m.update(latent_shape=[16, 1, 8, 8]))
    with pytest.raises(ProfileError, match=r"latent_shape must be 3 positive integers \(C, H', W'\)"):
        load_profile(tmp_path / "p")


@pytest.mark.parametrize("change, match", [
    (dict(guidance="cfg++"), "guidance must be one of"),
    (dict(guidance="embedded"), "n_branches 2 disagrees with guidance_scale 4.0 and guidance 'embedded'"),
    (dict(frames=True), "frames must be >= 1"),
])
def test_the_guidance_mode_and_frames_are_checked_on_load(tmp_path, change, match):
    make_profile().save(tmp_path / "p", plot=False)
    _edit(tmp_path / "p", lambda m: m.update(change))
    with pytest.raises(ProfileError, match=match):
        load_profile(tmp_path / "p")


def test_a_one_expert_profile_marked_schema_3_is_refused(tmp_path):
    make_profile().save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["schema_version"] == 2  # one expert stays 2
    _rewrite(tmp_path / "p", lambda meta: meta.update(schema_version=3))
    with pytest.raises(ProfileError, match="'experts' must hold two experts"):
        load_profile(tmp_path / "p")
