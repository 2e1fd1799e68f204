"""The Try page and the metrics chart in a real browser, on the tiny mnist model the mnist tests
train (tests/test_mnist.py's session fixtures: 2,000 images, one epoch). The job is a ledger
record whose pulled outputs are that model folder, as after `cube remote run ... --task train`
and a fetch; training it on a lab host would only make the test slower."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from controller.jobs import Job, Ledger, new_job_id
from tests.fixtures.browser import screenshot
from tests.test_mnist import CUBE, mnist_base, mnist_data, tiny_model  # noqa: F401 (fixtures)
from tests.test_ui import text, wait

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def trained_job(tiny_model, tmp_path) -> Job:  # noqa: F811
    log = tmp_path / "output.log"
    log.write_text("epoch 1/1: loss 0.9, accuracy 0.7\n")
    job = Job(id=new_job_id("mnist"), cube="mnist", host="lab1", tasks=["train"],
              cube_path=str(CUBE), state="succeeded", exit_code=0, workspace=str(tiny_model.parent),
              outputs=["model/"], outputs_pulled=True, log_path=str(log),
              started_at=time.time() - 30, ended_at=time.time())
    with Ledger() as ledger:
        ledger.save(job)
    return job


@pytest.fixture
def well_known_digit(tiny_model, mnist_data, tmp_path):  # noqa: F811
    """A test image the tiny model gets right with confidence, as a PNG -> (path, label)."""
    from PIL import Image

    from controller.serve import load_model, predict

    model = load_model(tiny_model)
    with np.load(mnist_data / "mnist.npz") as npz:
        images, labels = npz["x_test"][:200], npz["y_test"][:200]
    for pixels, label in zip(images, labels, strict=True):
        answer = predict(model, pixels)
        if answer["digit"] == label and max(answer["probabilities"]) > 0.9:
            buf = io.BytesIO()
            Image.fromarray(255 - pixels).resize((140, 140)).save(buf, format="PNG")  # dark on light
            path = tmp_path / f"digit-{label}.png"
            path.write_bytes(buf.getvalue())
            return path, int(label)
    pytest.fail("the tiny model is sure of none of the first 200 test digits")


def test_try_a_trained_model_on_an_uploaded_digit(browser, ui_server, trained_job,
                                                  well_known_digit):
    image, label = well_known_digit
    base = ui_server()
    browser.get(f"{base}/jobs/{trained_job.id}")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart svg text[data-series]"), 20,
         "no metrics chart")
    series = {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chart [data-series]")}
    assert {"loss", "accuracy", "test_accuracy"} <= series
    wait(browser, lambda d: "epoch 1/1" in text(d, "#log"), 20)
    screenshot(browser, "job-metrics")

    browser.find_element(By.ID, "try").click()
    browser.find_element(By.ID, "image").send_keys(str(image))
    browser.find_element(By.ID, "predict-image").click()
    wait(browser, lambda d: text(d, "#digit") not in ("", "–", "…"), 120, text(browser, "#try-error"))
    assert text(browser, "#digit") == str(label)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#probs tr")) == 10
    screenshot(browser, "try")

    pad = browser.find_element(By.ID, "pad")
    ActionChains(browser).move_to_element_with_offset(pad, 0, -90).click_and_hold() \
        .move_by_offset(0, 180).release().perform()
    browser.execute_script("document.getElementById('digit').textContent = ''")
    browser.find_element(By.ID, "predict-drawing").click()
    wait(browser, lambda d: text(d, "#digit").isdigit(), 60, text(browser, "#try-error"))


def test_try_refuses_a_job_without_a_model(browser, ui_server, tmp_path):
    job = Job(id=new_job_id("hello"), cube="hello", host="lab1", tasks=["greet"],
              state="succeeded", workspace=str(tmp_path), outputs=["greetings/"],
              outputs_pulled=True)
    with Ledger() as ledger:
        ledger.save(job)
    base = ui_server()
    browser.get(f"{base}/jobs/{job.id}/try")
    assert "has no Keras model" in text(browser, "#error")
    assert not browser.find_elements(By.ID, "pad")
