"""Editing a correction and the BRATS four-sequence chat in the web viewer, in a real headless Chromium.

As in tests/test_web_viewer.py: a real VILA-M3 MONAI Label server (stand-in VISTA3D and BRATS, the
chat's remote VLM the scripted OpenAI-compatible server), the viewer (``web/viewer.py``) in its own
process, Debian's Chromium driven by Playwright. The strokes are Playwright mouse drags on the Red
(axial) view; where they land in the volume comes from the view's geometry: with the lung preset the
volume's whole slice shows on screen, so its footprint maps screen pixels to voxel rows and columns.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from scipy import ndimage
from server_harness import RunningServer
from test_web_viewer import browser, footprint_box, red_view, settled_view  # noqa: F401  (browser: a fixture)
from web_harness import (
    browser_test_marks,
    chat_server_with_stand_ins,
    pick_ct,
    running_viewer,
)

from vila_m3.imaging import read_labelmap, read_volume
from vila_m3.imaging.slices import ras_view
from vila_m3.samples import ct_tumour_slice

pytestmark = browser_test_marks()

HEPATIC_TUMOR = 26
VIEWPORT = {"width": 2200, "height": 1100}
BRUSH_MM = 8.0
STROKE_VOXELS = 10  # a stroke's length along the columns
BRATS_SEGMENTS = ["edema", "enhancing tumor", "tumor core"]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    with chat_server_with_stand_ins(tmp_path_factory.mktemp("web-editor-server"), sample_data, fake_vlm.url, experts=("vista3d", "brats")) as server:
        yield server


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory, chat_server: RunningServer) -> Iterator[RunningServer]:
    with running_viewer(tmp_path_factory.mktemp("web-editor-viewer"), chat_server.url) as running:
        yield running


def display_slices(labels) -> np.ndarray:
    """The labelmap as the axial view shows it: (slices, rows anterior→posterior, columns right→left)."""
    return np.ascontiguousarray(ras_view(labels.array, labels.geometry)[:, ::-1, ::-1])


class ScreenGrid:
    """Screen ↔ voxel of the Red view's slice: the volume's footprint in the view's bitmap (lung
    preset: the whole slice is grey, outside it black) and where the bitmap lies on the page."""

    def __init__(self, page, plain: np.ndarray, shape: tuple[int, int]):
        self.top, self.left, bottom, right = footprint_box(plain)
        self.rows, self.columns = shape
        self.row_px, self.column_px = (bottom - self.top) / self.rows, (right - self.left) / self.columns
        box = page.locator("#views img.image-display-area").first.bounding_box()
        self.x0, self.y0 = box["x"], box["y"]
        self.scale_x, self.scale_y = box["width"] / plain.shape[1], box["height"] / plain.shape[0]

    def page_point(self, row: float, column: float) -> tuple[float, float]:
        """The page coordinates (CSS px) of voxel (row, column)'s centre."""
        x = self.left + (column + 0.5) * self.column_px
        y = self.top + (row + 0.5) * self.row_px
        return self.x0 + x * self.scale_x, self.y0 + y * self.scale_y


def drag(page, grid: ScreenGrid, row: int, column: int) -> None:
    """A stroke along the columns from (row, column), STROKE_VOXELS long, with the left button."""
    page.mouse.move(*grid.page_point(row, column))
    page.mouse.down()
    for step in range(1, STROKE_VOXELS + 1):
        page.mouse.move(*grid.page_point(row, column + step))
        page.wait_for_timeout(60)
    page.mouse.up()


def stroke_distance(shape: tuple[int, int], row: int, column: int) -> np.ndarray:
    """Each pixel's distance (voxels) from the stroke's segment (row, column)→(row, column + STROKE_VOXELS)."""
    rows, columns = np.mgrid[0:shape[0], 0:shape[1]]
    nearest = np.clip(columns, column, column + STROKE_VOXELS)
    return np.hypot(rows - row, columns - nearest)


def stroke_start(free: np.ndarray, clearance: float) -> tuple[int, int]:
    """The start of the stroke that keeps farthest inside ``free`` (at least ``clearance`` voxels)."""
    room = ndimage.distance_transform_edt(np.pad(free, 1))[1:-1, 1:-1]
    along = room.copy()
    for step in range(1, STROKE_VOXELS + 1):  # the room left along the whole stroke
        along[:, :-step] = np.minimum(along[:, :-step], room[:, step:])
    along[:, -STROKE_VOXELS:] = 0
    row, column = np.unravel_index(int(np.argmax(along)), along.shape)
    assert along[row, column] >= clearance, f"no room for a stroke on this slice ({along.max():.1f} voxels)"
    return int(row), int(column)


def densest_stroke(mask: np.ndarray, radius: float) -> tuple[int, int]:
    """The start of the stroke whose brush covers the most of ``mask`` (the stand-in's segments are noise)."""
    r = int(np.ceil(radius))
    rows, columns = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (np.hypot(rows, columns) <= radius).astype(float)
    cover = ndimage.convolve(mask.astype(float), disk, mode="constant")
    along = cover.copy()
    for step in range(1, STROKE_VOXELS + 1):
        along[:, :-step] += cover[:, step:]
    along[:, -STROKE_VOXELS:] = 0
    row, column = np.unravel_index(int(np.argmax(along)), along.shape)
    return int(row), int(column)


def wait_for_strokes(page, count: int) -> None:
    """Until the page's undo history holds ``count`` strokes (a stroke is applied when the button is released)."""
    page.wait_for_function(f"document.querySelector('#undo-stroke').dataset.strokes == '{count}'", timeout=60_000)


def test_paint_and_erase_a_correction_then_save_it_as_final_label(viewer, chat_server, browser, fake_vlm,  # noqa: F811
                                                                  sample_data, tmp_path):
    fake_vlm.script(sse(["This looks like a CT image. ", "Let me trigger <VISTA3D(hepatic tumor)>."]),
                    sse(["Yes, ", "the liver shows a lesion."]))
    k = ct_tumour_slice(sample_data)
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(viewer.url + "/")
    pick_ct(page)
    auto = settled_view(page)
    page.get_by_role("button", name="lung").click()
    lung = settled_view(page, differs_from=auto)
    page.fill("#slice-index", str(k))
    page.press("#slice-index", "Tab")
    page.wait_for_function(f"document.querySelector('#slice-index').value == '{k}'", timeout=30_000)
    plain = settled_view(page, differs_from=lung)

    page.fill("#question", "Is there a liver tumour?")
    page.click("#send")
    page.wait_for_selector("#segments .segment", timeout=300_000)
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Answered')", timeout=60_000)
    chat_id = page.inner_text("#chat-id").removeprefix("chat ").strip()
    response = requests.get(f"{chat_server.url}/vila_m3/chat/{chat_id}/labels", timeout=60)
    assert response.status_code == 200, response.text[:300]
    (tmp_path / "labels.nii.gz").write_bytes(response.content)
    labels = read_labelmap(tmp_path / "labels.nii.gz")
    before = display_slices(labels)
    liver_value = next(int(v) for v in np.unique(before[k]) if v not in (0, HEPATIC_TUMOR))

    spacing = sorted(labels.geometry.spacing)
    assert spacing[0] == pytest.approx(spacing[1]), "the test assumes square pixels in the axial view"
    radius = BRUSH_MM / 2 / spacing[0]  # the brush's radius, voxels
    grid = ScreenGrid(page, plain, before[k].shape)
    assert grid.row_px == pytest.approx(grid.column_px, rel=0.05)

    # paint the tumour segment over an empty area, far from any label
    paint_at = stroke_start(before[k] == 0, clearance=radius + 2)
    page.select_option("#edit-segment", label="hepatic tumor")
    page.click("#tool-paint")
    page.fill("#brush-mm", str(BRUSH_MM))
    page.press("#brush-mm", "Tab")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Paint:')", timeout=30_000)
    drag(page, grid, *paint_at)
    wait_for_strokes(page, 1)

    # a second stroke, elsewhere, undone: it must not reach the final label
    near_paint = stroke_distance(before[k].shape, *paint_at) <= 2 * radius + 6
    undone_at = stroke_start((before[k] == 0) & ~near_paint, clearance=radius + 2)
    drag(page, grid, *undone_at)
    wait_for_strokes(page, 2)
    page.click("#undo-stroke")
    wait_for_strokes(page, 1)

    # erase part of the liver where it is densest
    erase_at = densest_stroke(before[k] == liver_value, radius)
    page.select_option("#edit-segment", label="liver")
    page.click("#tool-erase")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Erase:')", timeout=30_000)
    drag(page, grid, *erase_at)
    wait_for_strokes(page, 2)
    page.click("#tool-view")

    page.click("#save-correction")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Saved')", timeout=120_000)
    final = requests.get(f"{chat_server.url}/datastore/label", params={"label": "ct_abdomen", "tag": "final"},
                         timeout=60)
    assert final.status_code == 200, final.text[:300]
    (tmp_path / "final.nii.gz").write_bytes(final.content)
    saved = read_labelmap(tmp_path / "final.nii.gz")
    assert saved.geometry.allclose(labels.geometry)
    after = display_slices(saved)

    painted = stroke_distance(before[k].shape, *paint_at)
    erased = stroke_distance(before[k].shape, *erase_at)
    undone = stroke_distance(before[k].shape, *undone_at)
    core_painted, core_erased = painted <= radius - 1.5, erased <= radius - 1.5
    assert core_painted.sum() > 20
    assert (after[k][core_painted] == HEPATIC_TUMOR).all(), "the painted stroke holds the tumour's label"
    was_liver = before[k] == liver_value
    assert (core_erased & was_liver).sum() > 20
    assert (after[k][core_erased & was_liver] == 0).all(), "the liver under the erased stroke is background"
    assert np.array_equal(after[k][core_erased & ~was_liver], before[k][core_erased & ~was_liver]), \
        "erasing the liver leaves the other segments"
    assert (after[k][undone <= radius - 1.5] == 0).all(), "the undone stroke left nothing"
    near = np.zeros(after.shape, dtype=bool)
    near[max(k - 1, 0):k + 2] = (painted <= radius + 4) | (erased <= radius + 4)
    assert np.array_equal(after[~near], before[~near]), "voxels away from both strokes are unchanged"
    page.close()


def test_a_four_sequence_mri_study_chats_with_brats(viewer, chat_server, browser, fake_vlm, sample_data,  # noqa: F811
                                                    tmp_path):
    fake_vlm.script(sse(["This looks like an MRI image sequence. ", "Let me first trigger <BRATS()>."]),
                    sse(["The scan shows a tumour ", "with oedema around it."]))
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(viewer.url + "/")
    page.wait_for_selector("#study-select option[value=brain_mri_flair]", state="attached", timeout=60_000)
    page.select_option("#study-select", "brain_mri_flair")
    page.wait_for_selector("#sequences [data-sequence=flair]", timeout=120_000)
    page.wait_for_function("document.querySelector('#status').innerText.includes('(T1c, T1, T2, FLAIR)')",
                           timeout=60_000)
    assert page.locator("#sequences [data-sequence]").evaluate_all("b => b.map(x => x.dataset.sequence)") \
        == ["t1c", "t1", "t2", "flair"]
    flair = settled_view(page)
    page.click("#sequences [data-sequence=t1c]")
    t1c = settled_view(page, differs_from=flair)  # the views show the sequence picked
    assert np.abs(t1c - flair).sum() > 0

    page.fill("#question", "Is there a brain tumour?")
    page.click("#send")
    page.wait_for_selector("#segments .segment", timeout=300_000)
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Answered')", timeout=60_000)
    assert "with oedema around it." in page.inner_text("#transcript")
    names = sorted(page.locator("#segments .segment").evaluate_all("rows => rows.map(r => r.dataset.segment)"))
    assert names == BRATS_SEGMENTS

    chat_id = page.inner_text("#chat-id").removeprefix("chat ").strip()
    chat = requests.get(f"{chat_server.url}/vila_m3/chat/{chat_id}", timeout=30).json()
    assert chat["study"]["image"] == "brain_mri_t1c"
    response = requests.get(f"{chat_server.url}/vila_m3/chat/{chat_id}/labels", timeout=60)
    (tmp_path / "labels.nii.gz").write_bytes(response.content)
    labels = read_labelmap(tmp_path / "labels.nii.gz")  # BRATS answers on the T1c grid
    t1c_volume = read_volume(sample_data / "studies" / "brain_mri_t1c.nii.gz")
    assert labels.geometry.allclose(t1c_volume.geometry, atol=1e-4)
    assert set(np.unique(labels.array)) == {0, 1, 2, 4}
    page.close()
