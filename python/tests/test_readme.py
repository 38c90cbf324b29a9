"""The FastAPI and Django snippets of python/README.md, run as written against a real
`jobrelay up` (service "docking" becomes the bundled "example"), so they cannot rot.
They skip, saying so, where FastAPI or Django is not installed (``pip install ./python[test]``
installs both)."""

from __future__ import annotations

import io
import json
import re
import types
import zipfile
from pathlib import Path
from typing import Any, Dict

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_SH = "#!/bin/bash\nset -e\ncat inputs/* > out.txt\n"


def snippet(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"### {heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"a python block under {heading}"
    return match.group(1).replace('service="docking"', 'service="example"')


def load(heading: str, tmp_path: Path, name: str) -> Dict[str, Any]:
    """Executes the snippet as a module whose file sits beside a run.sh."""
    (tmp_path / "run.sh").write_text(RUN_SH)
    module = types.ModuleType(name)
    module.__file__ = str(tmp_path / f"{name}.py")
    exec(compile(snippet(heading), module.__file__, "exec"), module.__dict__)
    return module.__dict__


def test_the_fastapi_snippet(url: str, tmp_path: Path, monkeypatch: Any) -> None:
    pytest.importorskip("fastapi", reason="FastAPI not installed")
    pytest.importorskip("multipart", reason="python-multipart not installed")
    from fastapi.testclient import TestClient

    monkeypatch.setenv("JOBRELAY_URL", url)
    monkeypatch.delenv("JOBRELAY_TOKEN", raising=False)
    app = load("FastAPI", tmp_path, "platform_fastapi")["app"]
    with TestClient(app) as web:
        files = [("inputs", ("a.txt", b"alpha\n")), ("inputs", ("b.txt", b"beta\n"))]
        created = web.post("/runs", params={"user_id": 11}, files=files)
        assert created.status_code == 201, created.text
        run = created.json()["id"]
        state = web.get(f"/runs/{run}", params={"wait": 60}).json()
        assert state == {"state": "Completed", "final": True, "message": state["message"]}
        results = web.get(f"/runs/{run}/results")
        assert results.status_code == 200
        with zipfile.ZipFile(io.BytesIO(results.content)) as zf:
            assert zf.read("out.txt") == b"alpha\nbeta\n"
        assert web.get("/runs/987654321").status_code == 404
        assert web.post("/runs/" + str(run) + "/cancel").json() == {"state": "Completed"}


def test_the_webhook_receiver_snippet(tmp_path: Path, monkeypatch: Any) -> None:
    pytest.importorskip("fastapi", reason="FastAPI not installed")
    from fastapi.testclient import TestClient

    import jobrelay

    monkeypatch.setenv("JOBRELAY_WEBHOOK_SECRET", "whsec-readme")
    app = load("Receiving webhooks (FastAPI)", tmp_path, "platform_hook")["app"]
    body = json.dumps({"id": 5, "status": "Completed"}).encode()
    headers = {
        "X-Jobrelay-Signature": jobrelay.webhooks.sign("whsec-readme", body),
        "X-Jobrelay-Delivery": "d-1",
        "Content-Type": "application/json",
    }
    with TestClient(app) as web:
        assert web.post("/jobrelay/hook", content=body, headers=headers).status_code == 204
        assert web.post("/jobrelay/hook", content=body, headers=headers).status_code == 204
        forged = {**headers, "X-Jobrelay-Signature": jobrelay.webhooks.sign("guess", body)}
        assert web.post("/jobrelay/hook", content=body, headers=forged).status_code == 400


def test_the_django_snippet(url: str, tmp_path: Path, monkeypatch: Any) -> None:
    pytest.importorskip("django", reason="Django not installed")
    import django
    from django.conf import settings

    monkeypatch.setenv("JOBRELAY_URL", url)
    monkeypatch.delenv("JOBRELAY_TOKEN", raising=False)
    if not settings.configured:
        settings.configure(
            DEBUG=True,
            ALLOWED_HOSTS=["testserver"],
            SECRET_KEY="test",
            JOBRELAY_URL=url,
            JOBRELAY_TOKEN=None,
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[],
            INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
        )
        django.setup()
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.http import Http404
    from django.test import RequestFactory

    views = load("Django", tmp_path, "platform_django")
    factory = RequestFactory()
    user = types.SimpleNamespace(is_authenticated=True, id=12)

    def request(method: str, path: str, **kwargs: Any) -> Any:
        made = getattr(factory, method)(path, **kwargs)
        made.user = user
        return made

    inputs = [SimpleUploadedFile("a.txt", b"alpha\n"), SimpleUploadedFile("b.txt", b"beta\n")]
    created = views["submit"](request("post", "/runs", data={"inputs": inputs}))
    assert created.status_code == 201, created.content
    run = int(json.loads(created.content)["id"])
    views["client"].job(run).wait(60)
    status = json.loads(views["status"](request("get", "/"), run).content)
    assert status["state"] == "Completed" and status["final"] is True
    response = views["results"](request("get", "/"), run)
    body = b"".join(response.streaming_content)
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.read("out.txt") == b"alpha\nbeta\n"
    user.id = 13
    with pytest.raises(Http404):
        views["status"](request("get", "/"), run)


def test_the_main_readme_python_block(url: str, tmp_path: Path, monkeypatch: Any) -> None:
    text = (README.parents[1] / "README.md").read_text()
    section = text.split("## From Python\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "a python block under From Python"
    examples = README.parents[1] / "examples" / "residues"
    code = match.group(1).replace("http://127.0.0.1:5000", url)
    code = code.replace('"examples/residues"', repr(str(examples)))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "results" / "residues.tsv").read_text().splitlines() == [
        "file\tchain\tresidues",
        "peptides.pdb\tA\t5",
        "peptides.pdb\tB\t3",
    ]


urlpatterns: list = []  # ROOT_URLCONF of the Django test
