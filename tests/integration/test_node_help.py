"""The pack's node help pages, served by a real ComfyUI (conftest.py's server).

The frontend's node help panel (Node Library → a node's help button, or the selection
toolbox / right-side panel "Info") fetches, for a node of a custom pack,
`/extensions/<pack>/docs/<NodeId>/<locale>.md` and then `/extensions/<pack>/docs/<NodeId>.md`,
where <pack> is the second part of the node's `python_module` ("custom_nodes.<pack>") up to
any "@". ComfyUI serves `/extensions/<folder>/` from the pack's WEB_DIRECTORY (web/). Without a
page the panel falls back to the node's one-line description. Newer frontends (1.3x+) also
refuse a page served as text/html.

These tests derive each URL from /object_info the way the frontend does, so a renamed folder,
a missing WEB_DIRECTORY or a node without a page fails here; and each page must name every
input and output of its node, so a new widget cannot go undocumented.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.comfy_support import PACK_FOLDER, REPO, pack_node_ids_in_source

pytestmark = [pytest.mark.comfyui]

DOCS = REPO / "web" / "docs"
# Every page answers these; the last may be called either way.
REQUIRED_SECTIONS = ("## Inputs", "## Outputs", "## Typical chain")
CAVEAT_SECTIONS = ("## Pitfalls", "## Good to know")


@pytest.fixture(scope="module")
def our_nodes(comfy_server) -> dict[str, dict]:
    """{node_id: object_info entry} for every node the server registered from this pack."""
    info = comfy_server.get_json("/object_info", timeout=60)
    return {name: entry for name, entry in info.items()
            if entry.get("python_module", "").split(".")[1:2] == [PACK_FOLDER]}


def help_url(entry: dict, locale: str | None = None) -> str:
    """The URL the frontend fetches (NodeHelpService.fetchCustomNodeHelp)."""
    module = entry["python_module"].split(".")
    assert module[0] == "custom_nodes", entry["python_module"]
    pack = module[1].split("@")[0]
    tail = f"{entry['name']}/{locale}.md" if locale else f"{entry['name']}.md"
    return f"/extensions/{urllib.parse.quote(pack)}/docs/{tail}"


def fetch(server, route: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(server.url + route, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), ""


def page(node_id: str) -> str:
    return (DOCS / f"{node_id}.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The body of `## heading` up to the next `## ` heading."""
    match = re.search(rf"^{re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else ""


def test_the_server_registered_every_node_of_the_pack(our_nodes):
    # Otherwise the checks below would pass vacuously for the nodes that failed to load.
    assert set(our_nodes) == pack_node_ids_in_source()


def test_every_node_has_its_page_served(comfy_server, our_nodes):
    for node_id, entry in sorted(our_nodes.items()):
        status, kind, body = fetch(comfy_server, help_url(entry))
        assert status == 200, f"{node_id}: {help_url(entry)} answered {status}"
        assert "text/html" not in kind, f"{node_id}: served as {kind}; newer frontends ignore HTML"
        assert body == page(node_id), f"{node_id}: the server sent something else than web/docs/{node_id}.md"
        title = body.splitlines()[0]
        assert title == f"# {entry['display_name']}", f"{node_id}: first line {title!r}"


def test_no_page_without_a_node(our_nodes):
    pages = {p.stem for p in DOCS.glob("*.md")}
    # Localised pages would live in docs/<NodeId>/<locale>.md.
    pages |= {p.name for p in DOCS.iterdir() if p.is_dir()}
    assert pages - set(our_nodes) == set(), "help pages for nodes the pack does not register"
    assert set(our_nodes) - pages == set(), "nodes without a help page"


def test_missing_locale_page_is_a_404_not_a_page(comfy_server, our_nodes):
    """The frontend tries docs/<NodeId>/<locale>.md first and falls back on a non-OK answer;
    an HTML page with 200 here would be shown instead of ours (older frontends)."""
    entry = our_nodes["LoraRarMerge"]
    if (DOCS / "LoraRarMerge").is_dir():
        pytest.skip("a localised page exists")
    status, _, _ = fetch(comfy_server, help_url(entry, "en"))
    assert status == 404


@pytest.mark.parametrize("node_id", sorted(pack_node_ids_in_source()))
def test_page_has_the_artist_sections(node_id):
    text = page(node_id)
    for heading in REQUIRED_SECTIONS:
        assert section(text, heading).strip(), f"{node_id}: no '{heading}' section"
    assert any(section(text, h).strip() for h in CAVEAT_SECTIONS), \
        f"{node_id}: no pitfalls section ({' or '.join(CAVEAT_SECTIONS)})"
    # The intro paragraph says what the node does before any table.
    intro = text.split("\n## ", 1)[0].splitlines()[1:]
    assert len(" ".join(intro).split()) >= 15, f"{node_id}: the introduction is too short"


def test_page_names_every_input_and_output(our_nodes):
    problems = []
    for node_id, entry in sorted(our_nodes.items()):
        text = page(node_id)
        inputs = [name for part in ("required", "optional") for name in entry["input"].get(part, {})]
        for name in inputs:
            if f"`{name}`" not in section(text, "## Inputs"):
                problems.append(f"{node_id}: input `{name}` is not described under ## Inputs")
        for name in entry["output_name"]:
            if f"`{name}`" not in section(text, "## Outputs"):
                problems.append(f"{node_id}: output `{name}` is not described under ## Outputs")
        for name in re.findall(r"^- \*\*`(\w+)`\*\*", section(text, "## Inputs"), re.MULTILINE):
            if name not in inputs:
                problems.append(f"{node_id}: ## Inputs describes `{name}`, which the node does not have")
    assert problems == []


def test_merge_page_describes_every_method(our_nodes):
    """One `### \\`name\\`` subsection per option of the method combo (new methods add theirs)."""
    spec = our_nodes["LoraRarMerge"]["input"]["required"]["method"]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    methods = section(page("LoraRarMerge"), "## Methods")
    described = re.findall(r"^### `([\w-]+)`", methods, re.MULTILINE)
    assert sorted(described) == sorted(options), (
        f"web/docs/LoraRarMerge.md ## Methods describes {described}; the node offers {options}")
    for name in options:
        body = methods.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        assert len(body.split()) >= 12, f"method {name}: say what it does and when to pick it"


def test_relative_links_in_pages_are_served(comfy_server, our_nodes):
    """The panel resolves relative links and images against /extensions/<pack>/docs/."""
    for node_id, entry in sorted(our_nodes.items()):
        base = help_url(entry).rsplit("/", 1)[0] + "/"
        for target in re.findall(r"\]\(([^)\s]+)", page(node_id)):
            if re.match(r"^[a-z]+:|^#", target):
                continue
            status, _, _ = fetch(comfy_server, urllib.parse.urljoin(base, target))
            assert status == 200, f"{node_id}: link {target} is not served"


def test_pages_are_plain_text_for_artists():
    """No machine paths, no HTML the panel would sanitise away, no developer jargon left in."""
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(/work/|/root/|/tmp/|/home/|[A-Z]:\\\w)", text), f"{path.name}: a machine path"
        html = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
        assert not re.search(r"<(script|iframe|style|div)\b", html, re.IGNORECASE), f"{path.name}: raw HTML"
        assert Path(path).stat().st_size < 20_000, f"{path.name}: a help page, not a manual"
