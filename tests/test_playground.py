"""The playground page in a real headless Chromium (Playwright): upload, submit, live progress, inline video.

Also field-level errors, and the same page mounted under a route prefix (``/avatar/``) on a gateway that
requires an API key: every request the page makes must stay under the prefix. The browser is Debian's
``chromium`` (``make browser-deps``); Playwright never downloads one.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from ray import serve

from deployments.config import APP_NAME, AppArgs
from deployments.gateway.deployment import Gateway
from testing.browser import chromium
from testing.media import EXAMPLE_IMAGE, REPO_ROOT, synthetic_speech

ARTIFACTS = REPO_ROOT / "test-artifacts"
AUDIO_S = 2.0
API_KEY = "playground-test-key"
PREFIX = "/avatar"
JOB_TIMEOUT_MS = 150_000
FINISHED = "['completed', 'failed', 'cancelled'].includes(document.body.dataset.job)"
VIDEO_DURATION = """() => new Promise((resolve, reject) => {
  const video = document.getElementById('video');
  const done = () => resolve({duration: video.duration, width: video.videoWidth, src: video.currentSrc});
  if (video.readyState >= 1) done();
  video.addEventListener('loadedmetadata', done, {once: true});
  video.addEventListener('error', () => reject(new Error('video error ' + (video.error && video.error.code))));
})"""


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture(scope="module")
def service(tmp_path_factory, serve_cluster):
    """The app at ``/`` (open), plus a second Gateway at ``/avatar`` that shares its backend and requires a key.

    The prefixed gateway is only a Gateway (not a second full app) to keep the test cheap on two cores; its
    files are served from the root gateway (``public_base_url``), since the Preprocessor reads uploads by URL.
    """
    root = tmp_path_factory.mktemp("playground-data")
    keys = root.parent / "playground-keys.txt"
    keys.write_text(API_KEY + "\n")
    config = {"device": "cpu", "max_running_jobs": 1, "storage": serve_cluster.local_storage(root, public=False),
              "denoiser": {"num_replicas": 1, "max_ongoing_requests": 1}}
    serve_cluster.deploy(config)
    prefixed = AppArgs.model_validate(config | {
        "auth": {"keys_file": str(keys)}, "storage": serve_cluster.local_storage(root)})
    handles = [serve.get_deployment_handle(name, APP_NAME)
               for name in ("Orchestrator", "Preprocessor", "Denoiser", "Postprocessor")]
    gateway = Gateway.options(name="Gateway").bind(*handles, prefixed)  # same jobs database and storage
    serve.run(gateway, name="stable-avatar-prefixed", route_prefix=PREFIX)
    return {"base": serve_cluster.base}


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    return synthetic_speech(tmp_path_factory.mktemp("playground-audio") / "speech.wav", AUDIO_S)


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("#server-state[data-state=ok]")
    return page, errors


def fill_form(page, image: Path, audio: Path, steps: str = "2", prompt: str = "a person talking") -> None:
    page.set_input_files("#image", str(image))
    page.set_input_files("#audio", str(audio))
    page.fill("#prompt", prompt)
    page.fill("#num_inference_steps", steps)


def wait_finished(page) -> str:
    page.wait_for_function(FINISHED, timeout=JOB_TIMEOUT_MS)
    return page.evaluate("document.body.dataset.job")


def check_video(page) -> dict:
    video = page.evaluate(VIDEO_DURATION)
    assert abs(video["duration"] - AUDIO_S) < 0.1, video
    assert video["width"] > 0
    assert page.get_attribute("#download", "href") == video["src"]
    assert page.get_attribute("#download", "download").endswith(".mp4")
    return video


def test_generate_from_the_page(browser, service, audio):
    page, errors = open_page(browser, service["base"] + "/")
    try:
        assert page.is_hidden("#api_key-field")  # this gateway runs without keys
        assert page.input_value("#guidance_scale") == "5" and page.input_value("#audio_guidance_scale") == "4"
        assert page.input_value("#num_inference_steps") == "50" and page.input_value("#perturbation") == "0.1"
        assert "no effect" in page.inner_text("#perturbation-hint")
        unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
            .filter((el) => el.labels.length === 0).map((el) => el.id)""")
        assert unlabelled == []
        assert page.input_value("#acceleration") == ""  # the server's default unless chosen
        assert page.eval_on_selector_all("#acceleration option", "os => os.map((o) => o.value)") == [
            "", "none", "regular", "high"]
        fill_form(page, EXAMPLE_IMAGE, audio)
        page.select_option("#aspect_ratio", "1:1")
        page.select_option("#acceleration", "regular")
        page.fill("#seed", "11")
        page.click("#submit")
        page.wait_for_function("document.getElementById('job-id').textContent.startsWith('Request ')")
        assert wait_finished(page) == "completed", page.inner_text("#job-status")
        page.wait_for_function("document.getElementById('progress').value === 100")
        assert page.inner_text("#progress-text") == "100%"
        logs = page.inner_text("#logs")
        assert "denoising step 2/2" in logs and "completed" in logs
        assert "acceleration regular" in logs  # the select's value reached the job
        check_video(page)
        assert "seed 11" in page.inner_text("#result-meta")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        assert not errors
    finally:
        page.close()


def test_bad_inputs_are_shown_next_to_their_field(browser, service, audio, tmp_path):
    page, errors = open_page(browser, service["base"] + "/")
    try:
        for bad in ("0", "500"):
            fill_form(page, EXAMPLE_IMAGE, audio, steps=bad)
            page.click("#submit")
            assert "between 1 and 100" in page.inner_text("#num_inference_steps-error")
            assert page.get_attribute("#num_inference_steps", "aria-invalid") == "true"
            assert page.evaluate("document.body.dataset.job") == "idle"  # nothing was sent
        page.fill("#prompt", "")
        page.fill("#num_inference_steps", "2")
        page.click("#submit")
        assert page.inner_text("#prompt-error") and not page.inner_text("#num_inference_steps-error")

        # Not an image, though named .png: only the server can tell; its 422 (loc image_url) lands at the image.
        fake = tmp_path / "portrait.png"
        fake.write_bytes(b"this is not an image")
        fill_form(page, fake, audio)
        page.click("#submit")
        assert wait_finished(page) == "failed"
        assert page.inner_text("#image_url-error"), page.inner_text("#form-error")
        assert page.get_attribute("#image", "aria-invalid") == "true"
        assert not page.inner_text("#audio_url-error") and page.is_hidden("#result")
        assert not errors
    finally:
        page.close()


def test_under_a_route_prefix_with_an_api_key(browser, service, audio):
    """``/avatar`` (no slash) redirects to ``/avatar/``; the key field appears, is required, and is remembered.

    ``?transport=poll`` makes the page poll the status instead of reading the SSE stream (the fallback path).
    """
    base = service["base"]
    page, errors = open_page(browser, f"{base}{PREFIX}?transport=poll")
    requests: list = []
    page.on("request", lambda request: requests.append(request))
    try:
        assert urlsplit(page.url).path == f"{PREFIX}/"
        assert page.is_visible("#api_key") and "API key required" in page.inner_text("#server-state")
        fill_form(page, EXAMPLE_IMAGE, audio)
        page.click("#submit")
        page.wait_for_function("document.getElementById('api_key-error').textContent !== ''")
        assert "required" in page.inner_text("#api_key-error")

        page.fill("#api_key", API_KEY)
        page.click("#submit")
        assert wait_finished(page) == "completed", page.inner_text("#job-status") + page.inner_text("#form-error")
        check_video(page)
        assert page.evaluate("document.getElementById('progress').value") == 100
        own = [r for r in requests if r.resource_type in ("fetch", "xhr", "document", "script", "stylesheet")
               and r.url.startswith(base)]
        assert own and all(urlsplit(r.url).path.startswith(f"{PREFIX}/") for r in own), [r.url for r in own]
        assert any(urlsplit(r.url).path.endswith("/status") for r in own)  # it polled

        page.reload()
        page.wait_for_selector("#server-state[data-state=ok]")
        assert page.input_value("#api_key") == API_KEY  # kept in localStorage
        assert not errors
    finally:
        page.close()


def test_drop_a_file_on_its_zone(browser, service):
    page, errors = open_page(browser, service["base"] + "/")
    try:
        files = page.evaluate_handle("""async () => {
            const data = new DataTransfer();
            const bytes = await (await fetch('static/playground.css')).blob();  // any bytes will do
            data.items.add(new File([bytes], 'dropped.wav', {type: 'audio/wav'}));
            return data;
        }""")
        zone = '.drop[data-input="audio"]'
        page.dispatch_event(zone, "dragover", {"dataTransfer": files})
        assert "dragging" in page.get_attribute(zone, "class")
        page.dispatch_event(zone, "drop", {"dataTransfer": files})
        assert page.evaluate("document.getElementById('audio').files[0].name") == "dropped.wav"
        assert page.is_visible("#audio-preview") and "dragging" not in page.get_attribute(zone, "class")
        assert not errors
    finally:
        page.close()
