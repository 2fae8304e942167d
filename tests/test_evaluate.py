"""posepriors-eval: metrics, Markdown/JSON output, plots, and the SMPLify GMM baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import posepriors
from posepriors import evaluate
from posepriors.data import load_poses
from posepriors.priors import GMMPrior
from tests.families import make, synthetic_poses, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    body = synthetic_poses(300, tuple(range(1, 22)), seed=11).numpy()
    np.savez(root / "body.npz", body_pose=body)
    prior, _ = train(make("global_flow_conditional"), steps=40)
    posepriors.save_pretrained(prior, root / "flow")
    gaussian = posepriors.priors.GaussianPrior().fit(torch.from_numpy(body))
    posepriors.save_pretrained(gaussian, root / "gaussian")
    wide = posepriors.priors.GaussianPrior(posepriors.priors.GaussianConfig(joints="body+left_hand+right_hand"))
    posepriors.save_pretrained(wide.fit(synthetic_poses(300, wide.joints, seed=12)), root / "wide")  # 51 joints
    return root


def test_evaluate_report(setup):
    prior = posepriors.load(setup / "flow")
    data = load_poses(setup / "body.npz")
    report = evaluate.evaluate(prior, data, model_name="flow", data_name="body", num_samples=64, max_poses=100)
    assert report.poses == 100 and report.nll.dims == 63
    assert np.isfinite(report.nll.mean) and report.samples.apd_deg > 0
    assert report.denoise.error_before_deg > 0 and np.isfinite(report.denoise.error_after_deg)
    assert [c.part for c in report.completion] == ["left_arm"]
    table = evaluate.to_markdown([report])
    assert table.count("\n") == 2 and "| flow | body |" in table


def test_denoising_with_the_true_gaussian_beats_noise(setup):
    # data drawn from a Gaussian prior: its MAP denoiser must reduce the error
    prior = posepriors.priors.GaussianPrior()
    with torch.no_grad():
        prior.mean.fill_(0.2)
        prior.log_std.fill_(np.log(0.1))
    clean = prior.sample(400, generator=torch.Generator().manual_seed(0))
    stats = evaluate.denoise_stats(prior, clean, sigma=0.2, generator=torch.Generator().manual_seed(1))
    # posterior std sqrt(0.1^2 0.2^2 / (0.1^2 + 0.2^2)) = 0.089 rad against 0.2 rad of noise
    assert stats.error_after_deg < stats.error_before_deg and stats.reduction > 0.4


def test_models_see_the_same_noisy_poses_and_reference_split(setup, monkeypatch):
    """A 21-joint and a 51-joint prior on body data: the same noisy poses on the body joints they share (the noise
    is drawn over the data's layout, from a generator the sampler does not consume), the same reference split."""
    data = load_poses(setup / "body.npz")
    priors = {name: posepriors.load(setup / name) for name in ("gaussian", "wide")}
    noisy, reports = {}, {}
    for name, prior in priors.items():
        denoise = prior.denoise

        def record(pose, *args, _name=name, _denoise=denoise, **kwargs):
            noisy[_name] = pose.clone()
            return _denoise(pose, *args, **kwargs)

        monkeypatch.setattr(prior, "denoise", record)
        reports[name] = evaluate.evaluate(prior, data, num_samples=32, max_poses=100, completion=False)
    shared = [priors["wide"].joints.index(j) for j in priors["gaussian"].joints]
    assert torch.equal(noisy["wide"][:, shared], noisy["gaussian"])
    assert reports["wide"].denoise.error_before_deg == reports["gaussian"].denoise.error_before_deg
    assert reports["wide"].samples.data_nearest_deg == reports["gaussian"].samples.data_nearest_deg
    with pytest.raises(ValueError, match=r"expected noise of the clean poses' shape \(4, 21, 3\), got \(4, 51, 3\)"):
        evaluate.denoise_stats(priors["gaussian"], torch.zeros(4, 21, 3), noise=torch.zeros(4, 51, 3))


def test_cli_denoising_figures_do_not_depend_on_other_tasks_or_models(setup):
    """``--no_samples`` (or another model's sampler) leaves the denoising noise alone: the same figures in both
    runs, and the same error before denoising for a 21-joint and a 51-joint prior on body data."""
    runs = []
    for extra in ([], ["--no_samples"]):
        out = setup / f"pairing{len(extra)}.json"
        args = ["--data", str(setup / "body.npz"), "--num_samples", "32", "--max_poses", "60", "--no_completion"]
        assert evaluate.main([str(setup / "wide"), str(setup / "gaussian"), *args, *extra, "--json", str(out)]) == 0
        runs.append({Path(r["model"]).name: r for r in json.loads(out.read_text())})
    with_samples, without = runs
    for name in ("wide", "gaussian"):
        assert with_samples[name]["denoise"] == without[name]["denoise"]
        assert without[name]["samples"] is None
    assert (
        with_samples["wide"]["denoise"]["error_before_deg"] == with_samples["gaussian"]["denoise"]["error_before_deg"]
    )
    nearest = [with_samples[name]["samples"]["data_nearest_deg"] for name in ("wide", "gaussian")]
    assert nearest[0] == nearest[1]


def test_cli_writes_json_markdown_and_plots(setup, capsys):
    pytest.importorskip("matplotlib")
    out = setup / "out"
    code = evaluate.main(
        [
            str(setup / "flow"),
            str(setup / "gaussian"),
            "--data",
            str(setup / "body.npz"),
            "--num_samples",
            "64",
            "--max_poses",
            "80",
            "--json",
            str(out / "r.json"),
            "--markdown",
            str(out / "r.md"),
            "--plots",
            str(out / "plots"),
        ]
    )
    assert code == 0
    reports = json.loads((out / "r.json").read_text())
    assert {r["model"] for r in reports} == {str(setup / "flow"), str(setup / "gaussian")}
    assert "NLL mean" in (out / "r.md").read_text()
    import matplotlib.image

    pngs = sorted((out / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert "nll_hist_0.png" in names and any(n.startswith("samples_") for n in names)
    assert any(n.startswith("denoise_") for n in names) and any(n.startswith("per_joint_nll") for n in names)
    for png in pngs:
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a real picture, not blank


def test_gmm_matches_a_reference_mixture(tmp_path):
    g = np.random.default_rng(0)
    K, D = 3, 69
    A = g.normal(size=(K, D, D)) * 0.1
    covars = A @ A.transpose(0, 2, 1) + 0.05 * np.eye(D)
    means, weights = g.normal(size=(K, D)) * 0.2, np.array([0.2, 0.5, 0.3])
    np.savez(tmp_path / "gmm.npz", means=means, covars=covars, weights=weights)
    prior = GMMPrior.from_smplify(tmp_path / "gmm.npz").double()
    x = torch.from_numpy(g.normal(size=(5, 21, 3)) * 0.2)
    from scipy.stats import multivariate_normal

    flat = x.reshape(5, 63).numpy()
    ref = np.log(
        sum(
            w * multivariate_normal(m[:63], c[:63, :63]).pdf(flat)
            for w, m, c in zip(weights, means, covars, strict=True)
        )
    )
    torch.testing.assert_close(prior.log_prob(x), torch.from_numpy(ref), atol=1e-6, rtol=1e-8)
    with pytest.raises(ValueError, match="means"):
        np.savez(tmp_path / "bad.npz", weights=weights)
        GMMPrior.from_smplify(tmp_path / "bad.npz")


@pytest.mark.shared_data
def test_smplify_gmm_on_shared_data(shared_data):
    gmm = GMMPrior.from_smplify(shared_data.parent / "baselines" / "smplify_gmm_08.npz")
    val = torch.from_numpy(np.load(shared_data / "body_val.npz")["body_pose"])
    nll = gmm.nll(val)
    assert torch.isfinite(nll).all() and -80 < nll.mean() < 40


def test_completion_parts_hide_only_observed_joints_and_never_twice():
    prior = posepriors.priors.GaussianPrior(posepriors.priors.GaussianConfig(joints="body+left_hand+right_hand"))
    body_only = torch.tensor([j <= 21 for j in prior.joints])
    parts = evaluate.completion_parts(prior, body_only)
    assert list(parts) == ["left_arm"]  # no hand is observed; the arm is hidden down to the wrist
    names = [prior.joint_names[i] for i in parts["left_arm"].nonzero().flatten()]
    assert names == ["left_shoulder", "left_elbow", "left_wrist"]
    hands_only = ~body_only
    parts = evaluate.completion_parts(prior, hands_only)
    assert list(parts) == ["left_hand", "right_hand"]  # the left arm of hand data is its hand: not listed twice


def test_completion_a_prior_cannot_do_is_skipped_with_a_warning():
    prior = make("global_flow")  # no completion flow: an arbitrary mask cannot be completed
    pose = synthetic_poses(8, prior.joints, seed=3)
    observed = torch.ones(prior.num_joints, dtype=torch.bool)
    with pytest.warns(UserWarning, match="completion of left_arm skipped"):
        stats = evaluate.completion_stats(prior, pose, observed, noise_std=None)
    assert [s.part for s in stats] == ["right_hand"]  # a trailing part: exact, kept


def test_hand_vae_report_has_a_reconstruction_error():
    prior = make("hand_vae").eval()
    poses = prior.to_smplx(synthetic_poses(32, prior.joints, seed=5))
    observed = torch.zeros(32, 55, dtype=torch.bool)
    observed[:, list(prior.joints)] = True
    data = posepriors.data.PoseData(poses, observed, torch.zeros(32, dtype=torch.long), ["synthetic"], [])
    report = evaluate.evaluate(prior, data, samples=False, denoise=False, completion=False)
    assert report.reconstruction_deg is not None and 0 < report.reconstruction_deg < 180


def test_cli_skips_a_model_without_a_density_for_the_data_and_goes_on(tmp_path, capsys):
    """Hands without a body: global_flow (body first, hands given the body) has no density for them; the run
    skips it, says why, and evaluates the other model (it aborted with exit 2 before)."""
    rng = np.random.default_rng(0)
    hands = rng.normal(scale=0.2, size=(40, 15, 3)).astype(np.float32)
    np.savez(tmp_path / "hands.npz", left_hand_pose=hands, right_hand_pose=hands[::-1].copy())
    code = evaluate.main(
        ["global_flow", "hands", "--data", str(tmp_path / "hands.npz"), "--no_samples", "--no_denoise",
         "--no_completion"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    assert "skipping global_flow on" in err and "exact densities only for masks" in err
    assert "| hands | hands.npz |" in out and "| global_flow |" not in out


def test_evaluate_refuses_a_negative_seed(setup):
    """The task generators derive their seeds from it (NumPy's SeedSequence): a negative one is refused up front."""
    prior = posepriors.load(setup / "gaussian")
    with pytest.raises(ValueError, match=r"expected seed to be an integer >= 0, got -1"):
        evaluate.evaluate(prior, load_poses(setup / "body.npz"), seed=-1)
    report = evaluate.evaluate(prior, load_poses(setup / "body.npz"), seed=np.int64(3), max_poses=50, completion=False)
    assert report.denoise is not None  # a NumPy integer seed is a seed
