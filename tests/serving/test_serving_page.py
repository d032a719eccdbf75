"""The demo page at / in a real headless browser (Debian's chromium driven by playwright).

Setup (CI): ``apt-get install -y chromium`` and ``pip install playwright`` (the Python
package only; never ``playwright install``: the test uses /usr/bin/chromium).
"""

from __future__ import annotations

import io
import os
import shutil

import pytest
from helpers import SMALL_SCALE, local_server, shapes_image, tiny_config, write_checkpoint
from PIL import Image

CHROMIUM = os.environ.get("BOXTEACHER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("page") / "tiny.pth", tiny_config(overrides=SMALL_SCALE))
    with local_server(ckpt) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_upload_segment_and_draw_a_box(server, page):
    pixels = shapes_image(41, 0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))

    page.goto(server.url + "/")
    assert "boxteacher" in page.title()
    # record the form fields of every request the page sends
    page.evaluate(
        """() => { const send = window.fetch; window.sent = [];
                   window.fetch = (url, opts) => { window.sent.push([...opts.body.entries()].map(([k, v]) => [k, String(v)]));
                                                   return send(url, opts); }; }"""
    )
    page.set_input_files("#file", files=[{"name": "shapes.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    page.wait_for_function("() => !document.getElementById('segment').disabled")
    page.fill("#threshold", "0")
    page.click("#segment")
    page.wait_for_function("() => document.getElementById('results').dataset.count !== '0'", timeout=30000)
    count = int(page.get_attribute("#results", "data-count"))
    assert count == page.locator("#results tbody tr").count() > 1
    assert "instance(s)" in page.inner_text("#status")
    # the page's RLE decoder agrees with the areas the server computed
    areas = page.evaluate("() => state.result.instances.map((i) => [decodeRle(i.mask).reduce((a, b) => a + b, 0), i.area])")
    assert all(a == b for a, b in areas) and len(areas) == count
    # masks are drawn over the image
    changed = page.evaluate(
        """() => {
          const c = document.getElementById('canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          const o = document.createElement('canvas'); o.width = c.width; o.height = c.height;
          const octx = o.getContext('2d'); octx.drawImage(state.image, 0, 0);
          const e = octx.getImageData(0, 0, c.width, c.height).data;
          let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] !== e[i] || d[i + 1] !== e[i + 1]) n++;
          return n / (c.width * c.height);
        }"""
    )
    assert changed > 0.05

    # draw one box: exactly one instance comes back, inside the box
    box = page.locator("#canvas").bounding_box()
    sx, sy = box["width"] / 96, box["height"] / 96
    page.mouse.move(box["x"] + 10 * sx, box["y"] + 12 * sy)
    page.mouse.down()
    page.mouse.move(box["x"] + 40 * sx, box["y"] + 30 * sy, steps=4)
    page.mouse.move(box["x"] + 60 * sx, box["y"] + 50 * sy, steps=4)
    page.mouse.up()
    assert page.evaluate("() => state.boxes.length") == 1
    page.click("#segment")
    page.wait_for_function("() => document.getElementById('results').dataset.count === '1'", timeout=30000)
    inst = page.evaluate("() => state.result.instances[0]")
    x1, y1, x2, y2 = inst["box"]
    assert (x1, y1) == pytest.approx((10, 12), abs=1.5) and (x2, y2) == pytest.approx((60, 50), abs=1.5)
    assert inst["source"] in ("matched", "prompt")
    # the box went with the image_id of the first answer, not the file again
    image_id = page.evaluate("() => state.imageId")
    sent = page.evaluate("() => window.sent")
    assert len(image_id) == 64 and [[k for k, _ in fields] for fields in sent] == [["image"], ["image_id", "boxes"]]
    assert sent[1][0][1] == image_id

    # an image_id the server does not hold (404 image_not_cached): the page uploads the file again
    page.evaluate("() => { state.imageId = '0'.repeat(64); state.result = null; }")
    page.click("#segment")
    page.wait_for_function(f"() => state.imageId === '{image_id}' && state.result !== null", timeout=30000)
    sent = page.evaluate("() => window.sent")
    assert sent[2] == [["image_id", "0" * 64], sent[1][1]] and [k for k, _ in sent[3]] == ["image", "boxes"]
    assert "instance(s)" in page.inner_text("#status")
    assert errors == []
