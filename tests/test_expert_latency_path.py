# ruff: noqa: F811  (pytest fixtures imported from bundle_fixtures are test arguments of the same name)
"""The fast path of an expert call gives what MONAI's bundle transforms give: the CT resampled onto the
model's grid straight from its int16 pixels (the float32 image equals MONAI's on the test volumes; the
float64 interpolation differs from ``grid_sample``'s by round-off only, < 1e-12 relative), the labels put
back on the input grid by per-axis nearest-neighbour indices instead of ``Invertd``'s full-volume affine
grid (voxel for voxel), the labelmap encoded once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_fixtures import block_phantom, ct_volume, make_probe_bundle, rotation, tiny_vista3d_bundle  # noqa: F401
from monai.apps.vista3d.transforms import VistaPostTransformd
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Spacingd, SpatialResample

from vila_m3.experts.bundle import (
    image_from_arrays,
    last_resample,
    preprocess_from_pixels,
    ras_affine,
    resample_input_dtype,
)
from vila_m3.experts.vista3d import Vista3DRunner
from vila_m3.imaging import Geometry, Volume, read_labelmap, save_labelmap
from vila_m3.imaging.resample import axis_aligned, linear_to_grid_zyx, nearest_to_grid_zyx, tie_planes

PROMPT = [3, 1]


def reference_image(volume: Volume) -> MetaTensor:
    """The CT as MONAI's LoadImaged hands it to the bundle: a contiguous (X, Y, Z) float32 copy."""
    image = image_from_arrays([volume.array], volume.geometry)
    data = np.ascontiguousarray(volume.array.transpose(2, 1, 0)).astype(np.float32)
    return MetaTensor(torch.from_numpy(data), affine=image.affine, meta=dict(image.meta))


def bundle_reference(runner: Vista3DRunner, volume: Volume, logits: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The bundle's own transforms end to end: its preprocessing on the LoadImaged-like image, then its
    postprocessing (VistaPostTransformd, Invertd through the whole preprocessing, NaN as background).
    Returns (the preprocessed image, the (z, y, x) labels)."""
    preprocessing = Compose(runner.bundle.transforms("preprocessing"))
    data = preprocessing({"image": reference_image(volume), "label_prompt": list(PROMPT)})
    class_vector = torch.as_tensor(data["label_prompt"]).reshape(-1, 1)
    post = Compose([
        VistaPostTransformd(keys="pred"),
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True),
    ])
    pred = MetaTensor(logits, meta=dict(data["image"].meta))
    out = post({"image": data["image"], "pred": pred, "label_prompt": class_vector})["pred"]
    assert tuple(out.shape[1:]) == volume.geometry.shape
    np.testing.assert_allclose(np.asarray(out.affine), ras_affine(volume.geometry), atol=1e-6)
    labels = torch.nan_to_num(out[0].float(), nan=0.0).round().numpy().transpose(2, 1, 0).astype(np.uint8)
    return data["image"], labels


@pytest.fixture(scope="module")
def phantom() -> Volume:
    return block_phantom()[0]


@pytest.mark.parametrize("network", ["probe", "stand-in"])
def test_fast_path_gives_the_bundle_transforms_labelmap(network: str, phantom: Volume, tiny_vista3d_bundle: Path,
                                                       tmp_path: Path) -> None:
    """Oblique, axis-permuted, anisotropic CT (1.1 x 0.9 x 2.5 mm): same preprocessed image, same labels."""
    bundle = make_probe_bundle(tmp_path / "probe", threshold_hu=500.0) if network == "probe" else tiny_vista3d_bundle
    runner = Vista3DRunner(bundle, device="cpu")
    prepared = runner.prepare(phantom, PROMPT, "test")
    logits = runner.infer(prepared)
    result = runner.finish(prepared, logits)

    image, expected = bundle_reference(runner, phantom, logits)
    assert prepared.data["image"].dtype == image.dtype == torch.float32
    assert torch.equal(prepared.data["image"].as_tensor(), image.as_tensor()), "the model sees other numbers"
    assert result.labels.array.dtype == np.uint8
    assert result.labels.geometry == phantom.geometry
    assert len(np.unique(expected)) > 1, "the comparison needs labels and background"
    np.testing.assert_array_equal(result.labels.array, expected)


def test_the_sample_ct_gives_the_bundle_transforms_labelmap(ct_volume: Volume, tiny_vista3d_bundle: Path) -> None:
    """The sample CT (256 x 256 x 64, oblique in-plane): the directly resampled image and the labels are
    the bundle's own transforms', and the direct resampling (not the bundle's way) ran."""
    runner = Vista3DRunner(tiny_vista3d_bundle, device="cpu")
    direct = preprocess_from_pixels(runner.bundle.transforms("preprocessing"), {"label_prompt": list(PROMPT)},
                                    ct_volume.array, ct_volume.geometry)
    assert direct is not None, "the direct resampling did not run on the sample CT"
    prepared = runner.prepare(ct_volume, PROMPT, "test")
    result = runner.finish(prepared, runner.infer(prepared))
    image, expected = bundle_reference(runner, ct_volume, runner.infer(prepared))
    assert torch.equal(direct["image"].as_tensor(), image.as_tensor())
    assert torch.equal(prepared.data["image"].as_tensor(), image.as_tensor())
    np.testing.assert_allclose(np.asarray(prepared.data["image"].affine), np.asarray(image.affine), atol=0)
    assert len(np.unique(expected)) > 1
    np.testing.assert_array_equal(result.labels.array, expected)


def test_direct_resampling_keeps_monai_record(phantom: Volume, tiny_vista3d_bundle: Path) -> None:
    """The directly resampled image carries the record MONAI's eager ``Spacingd`` leaves (what ``Invertd``
    reads), and the phantom takes the direct way."""
    transforms = Vista3DRunner(tiny_vista3d_bundle, device="cpu").bundle.transforms("preprocessing")
    at = last_resample(transforms)
    direct = preprocess_from_pixels(transforms[: at + 1], {}, phantom.array, phantom.geometry)
    assert direct is not None
    eager = Compose(transforms[: at + 1])({"image": reference_image(phantom)})["image"]
    assert direct["image"].dtype == eager.dtype == torch.float32 and direct["image"].shape == eager.shape
    assert torch.equal(direct["image"].as_tensor(), eager.as_tensor())
    assert torch.equal(torch.as_tensor(direct["image"].affine), torch.as_tensor(eager.affine))
    ours, theirs = direct["image"].applied_operations, eager.applied_operations
    assert len(ours) == len(theirs) == 1 and not direct["image"].pending_operations
    assert set(ours[0]) == set(theirs[0]) and ours[0]["lazy"] is False
    assert ours[0]["orig_size"] == theirs[0]["orig_size"]
    for name in ("dtype", "mode", "padding_mode", "align_corners"):
        assert ours[0]["extra_info"][name] == theirs[0]["extra_info"][name]
    assert torch.equal(ours[0]["extra_info"]["src_affine"], theirs[0]["extra_info"]["src_affine"])


def test_direct_resampling_declines_what_it_does_not_handle(phantom: Volume, tiny_vista3d_bundle: Path) -> None:
    transforms = Vista3DRunner(tiny_vista3d_bundle, device="cpu").bundle.transforms("preprocessing")
    at = last_resample(transforms)
    nearest = Spacingd("image", pixdim=(4.0, 4.0, 4.0), mode="nearest")
    assert preprocess_from_pixels([*transforms[:at], nearest], {}, phantom.array, phantom.geometry) is None
    assert preprocess_from_pixels([transforms[at + 1], *transforms], {}, phantom.array, phantom.geometry) is None
    assert preprocess_from_pixels(transforms[:at], {}, phantom.array, phantom.geometry) is None  # no Spacingd


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("oblique", [False, True])
def test_linear_to_grid_matches_monai_spatial_resample(padding: str, oblique: bool) -> None:
    """Random int16 HU on a 0.8 x 0.8 x 2 mm grid resampled trilinearly onto a 4 mm grid that sticks out of
    it (border / zeros padding decide there): MONAI's float64 values within 1e-12 relative, and the
    float32 image ``Spacingd`` returns equal, or at most one float32 rounding step apart."""
    direction = rotation((0.3, 1.0, 0.5), 17.0) if oblique else np.eye(3)
    fine = Geometry(spacing=(0.8, 0.8, 2.0), origin=(-20.0, 7.0, 3.0), direction=direction, shape=(90, 70, 30))
    coarse = Geometry(spacing=(4.0, 4.0, 4.0), origin=fine.index_to_physical((-3.3, 1.7, 0.6)), direction=direction,
                      shape=(20, 16, 17))
    pixels = np.random.default_rng(1).integers(-1024, 3000, size=fine.shape[::-1]).astype(np.int16)
    src_affine, dst_affine = ras_affine(fine), ras_affine(coarse)
    xform = np.linalg.solve(src_affine, dst_affine)
    ours = linear_to_grid_zyx(pixels, xform, coarse.shape, padding=padding)
    image = MetaTensor(torch.from_numpy(pixels.transpose(2, 1, 0).astype(np.float64))[None],
                       affine=torch.as_tensor(src_affine))
    theirs = monai_trilinear(image, dst_affine, coarse.shape, padding)
    assert ours.shape == coarse.shape[::-1] and ours.dtype == np.float64
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-12 * scale
    ours32, theirs32 = ours.astype(np.float32), theirs.astype(np.float32)
    assert np.all(np.abs(ours32 - theirs32) <= np.spacing(np.abs(theirs32)))
    if padding == "zeros":
        assert (theirs == 0).sum() > 0, "part of the coarse grid lies outside the fine one"
    assert len(np.unique(np.round(ours))) > 100


def monai_trilinear(image: MetaTensor, dst_affine: np.ndarray, shape, padding: str) -> np.ndarray:
    """MONAI's trilinear float64 ``SpatialResample`` (what ``Spacingd`` runs) before its float32 cast,
    as a (Z, Y, X) float64 array."""
    from monai.networks.layers import AffineTransform

    xform = torch.as_tensor(np.linalg.solve(np.asarray(image.affine, dtype=np.float64), dst_affine))
    out = AffineTransform(normalized=False, mode="bilinear", padding_mode=padding, align_corners=False,
                          reverse_indexing=True)(image.as_tensor()[None], theta=xform, spatial_size=shape)
    return out[0, 0].numpy().transpose(2, 1, 0)


def test_the_phantom_exercises_midpoint_samples(phantom: Volume, tiny_vista3d_bundle: Path) -> None:
    """The oblique phantom's resampling puts whole planes of samples on midpoints between two voxels of
    the model's grid (1.1 mm / 4 mm = 0.275: every 20th x plane), where rounding decides: the test above
    covers them, and the map is axis-aligned (the fast path, not MONAI's full inversion, ran)."""
    transforms = Vista3DRunner(tiny_vista3d_bundle, device="cpu").bundle.transforms("preprocessing")
    at = last_resample(transforms)
    resampled = Compose(transforms[: at + 1])({"image": reference_image(phantom)})["image"]
    xform = np.linalg.solve(np.asarray(resampled.affine, dtype=np.float64), ras_affine(phantom.geometry))
    assert axis_aligned(xform)
    assert tie_planes(xform, phantom.geometry.shape), "no sample of this phantom falls on a midpoint"


def monai_nearest(values: torch.Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, shape, padding: str):
    """MONAI's own nearest-neighbour SpatialResample (what Invertd runs), as a (Z, Y, X) array."""
    image = MetaTensor(values[None].double(), affine=torch.as_tensor(src_affine))
    out = SpatialResample(mode="nearest", padding_mode=padding, dtype=torch.float64)(
        image, dst_affine=torch.as_tensor(dst_affine), spatial_size=shape)
    return out[0].numpy().transpose(2, 1, 0)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("oblique", [False, True])
def test_nearest_to_grid_matches_monai_spatial_resample(padding: str, oblique: bool) -> None:
    """Random labels on a 4 mm grid back onto a 0.8 x 0.8 x 2 mm grid that sticks out of it: every fifth
    x / y plane samples a midpoint; the result is MONAI's, voxel for voxel, in (z, y, x) order."""
    direction = rotation((0.3, 1.0, 0.5), 17.0) if oblique else np.eye(3)
    fine = Geometry(spacing=(0.8, 0.8, 2.0), origin=(-20.0, 7.0, 3.0), direction=direction, shape=(90, 70, 30))
    coarse = Geometry(spacing=(4.0, 4.0, 4.0), origin=fine.index_to_physical((2.0, 1.5, 4.0)), direction=direction,
                      shape=(15, 12, 12))
    src_affine, dst_affine = ras_affine(coarse), ras_affine(fine)
    values = torch.randint(0, 7, coarse.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    xform = np.linalg.solve(src_affine, dst_affine)
    ours = nearest_to_grid_zyx(values, xform, fine.shape, padding=padding)
    expected = monai_nearest(values, src_affine, dst_affine, fine.shape, padding)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == fine.shape[::-1]
    np.testing.assert_array_equal(ours.numpy(), expected.astype(np.uint8))
    if padding == "zeros":
        assert (ours == 0).sum() > (values == 0).sum() * 25, "part of the fine grid lies outside the coarse one"


def test_nearest_to_grid_refuses_rotations() -> None:
    xform = np.eye(4)
    xform[:3, :3] = rotation((0.0, 0.0, 1.0), 10.0)
    with pytest.raises(ValueError, match="rotates or shears"):
        nearest_to_grid_zyx(torch.zeros((4, 4, 4), dtype=torch.uint8), xform, (8, 8, 8))


def test_image_is_handed_over_in_the_resampling_dtype_only_when_exact(phantom: Volume,
                                                                     tiny_vista3d_bundle: Path) -> None:
    transforms = Vista3DRunner(tiny_vista3d_bundle, device="cpu").bundle.transforms("preprocessing")
    assert resample_input_dtype(transforms, np.int16) == np.float64  # Spacingd computes in float64
    assert resample_input_dtype(transforms, np.float64) == np.float32  # LoadImaged would round to float32
    assert resample_input_dtype(transforms[2:], np.int16) == np.float64
    assert resample_input_dtype([transforms[3], *transforms], np.int16) == np.float32  # a crop before it
    image = image_from_arrays([phantom.array], phantom.geometry, dtype=np.float64)
    assert image.is_contiguous() and image.dtype == torch.float64
    np.testing.assert_array_equal(image.numpy(), phantom.array.transpose(2, 1, 0))


def test_a_labelmap_is_encoded_once(phantom: Volume, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vila_m3.imaging.io as io_module

    encodings = []
    real_write = io_module.write_labelmap
    monkeypatch.setattr(io_module, "write_labelmap", lambda *a, **k: encodings.append(a[2]) or real_write(*a, **k))
    labels = Volume(array=(phantom.array > 500).astype(np.uint8) * 3, geometry=phantom.geometry)
    first = save_labelmap(labels, tmp_path / "a" / "first.nii.gz")
    second = save_labelmap(labels, tmp_path / "b" / "second.nii.gz")
    assert len(encodings) == 1 and second.read_bytes() == first.read_bytes()
    back = read_labelmap(second)
    assert back.geometry.allclose(phantom.geometry, atol=1e-5)
    np.testing.assert_array_equal(back.array, labels.array)
    assert not list(tmp_path.rglob(".*.tmp"))
    changed = Volume(array=labels.array.copy(), geometry=labels.geometry)  # another result: encoded anew
    save_labelmap(changed, tmp_path / "third.nii.gz")
    assert len(encodings) == 2


@pytest.mark.parametrize("classes", [1, 2, 4])
def test_prompted_labels_are_vista_post_transform_labels(classes: int) -> None:
    """The labels from the logits equal ``VistaPostTransformd``'s, ties (first class wins), all-negative
    and exactly-zero voxels included; NaN logits are left to MONAI's transform."""
    from vila_m3.experts.vista3d import _prompted_labels

    generator = torch.Generator().manual_seed(classes)
    logits = torch.randint(-3, 4, (classes, 9, 8, 7), generator=generator).float() / 2  # many ties and zeros
    prompt = torch.tensor([5, 26, 1, 132][:classes])
    expected = VistaPostTransformd(keys="pred")({"pred": logits.clone(), "label_prompt": prompt.reshape(-1, 1)})
    ours = _prompted_labels(logits, prompt)
    assert ours is not None and ours.dtype == torch.float32 and ours.shape == (1, 9, 8, 7)
    assert torch.equal(ours, expected["pred"])
    assert len(torch.unique(ours)) == classes + 1
    logits[0, 0, 0, 0] = float("nan")
    assert _prompted_labels(logits, prompt) is None
