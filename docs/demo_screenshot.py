"""Screenshot of the ``mmf-demo`` page after one generation, taken with headless Chromium, and a check that it shows
the grid. Not part of the package; it needs selenium (``pip install selenium``, any environment) and Debian's
``chromium`` and ``chromium-driver``:

    mmf-demo --pipeline pipelines/mmf-mnist --server-port 7860 &
    python docs/demo_screenshot.py --url http://127.0.0.1:7860/ --output docs/demo_screenshot.png

It loads the page (gradio pages are built by JavaScript), presses "Generate", waits for the image and the line that says
how long generation took, and saves a 1200 x 900 screenshot (quantised to 64 colours to keep the PNG small). The check,
on the screenshot's pixels: the page is not blank, and inside the output image's box most pixels are the black
background of MNIST digits with a few percent of bright strokes, and each of the 4 x 4 tiles of the default request
(16 images) holds some of them.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--output", default="docs/demo_screenshot.png")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the page and the image")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
                 "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)
    try:
        wait = WebDriverWait(driver, args.timeout)
        start = time.perf_counter()
        driver.get(args.url)
        button = wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Generate']")))
        loaded = time.perf_counter() - start
        button.click()
        image = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#mmf-output img")))
        wait.until(lambda d: "generated in" in d.find_element(By.ID, "mmf-info").text)
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        info = driver.find_element(By.ID, "mmf-info").text
        time.sleep(0.5)  # let the image's fade-in finish
        box = driver.execute_script("const r = arguments[0].getBoundingClientRect();"
                                    "return [r.left, r.top, r.right, r.bottom];", image)
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    finally:
        driver.quit()

    page = np.asarray(shot.convert("L"), dtype=np.float64)
    left, top, right, bottom = (int(round(v)) for v in box)
    inner = page[top + 4:bottom - 4, left + 4:right - 4]  # inside the grid's outer padding
    dark, bright = float((inner < 40).mean()), float((inner > 200).mean())
    # The default request is 16 images, tiled 4 x 4: every tile holds a digit, i.e. some bright strokes.
    cells = [float((cell > 200).mean()) for row in np.array_split(inner, 4, axis=0)
             for cell in np.array_split(row, 4, axis=1)]
    report = {
        "url": args.url, "page_ready_s": round(loaded, 2), "info": info, "screenshot": args.output,
        "size": shot.size, "page_std": round(float(page.std()), 1), "image_box": [left, top, right, bottom],
        "grid_dark_fraction": round(dark, 3), "grid_bright_fraction": round(bright, 3),
        "bright_fraction_per_tile": [round(c, 3) for c in cells],
    }
    checks = {
        "the page is not blank": page.std() > 20,
        "the grid is at least 300 px wide on the page": right - left >= 300 and bottom - top >= 300,
        "the grid is mostly black background": dark > 0.5,
        "the grid has bright digit strokes": 0.02 < bright < 0.4,
        "each of the 4 x 4 tiles holds strokes": min(cells) > 0.01,
    }
    report["checks"] = {name: bool(ok) for name, ok in checks.items()}
    shot.quantize(64).save(args.output, optimize=True)
    print(json.dumps(report, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
