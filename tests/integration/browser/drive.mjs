// Drives the real ComfyUI frontend (served by a real ComfyUI server) in Debian's headless
// Chromium, for tests/integration/test_browser.py and for (re)building example_workflows/.
// Written against two frontend generations (see frontendNotices): the 1.2x that ComfyUI pins
// and the newest 1.5x from PyPI.
//
//   node drive.mjs check URL OUT_DIR|- WORKFLOW.json...  open each workflow file as a user does
//        (app.handleFile, what Open and drag-and-drop call), report what the frontend tells the
//        user (missing nodes, missing models, anything else), node errors, links and the API
//        prompt; OUT_DIR gets <name>.user.png (the screen right after opening),
//        <name>.notices.png (after "View details", where there is one) and <name>.png (the
//        fitted canvas, for thumbnails). Prints one JSON report.
//   node drive.mjs template URL PACK NAME...            open each of the pack's templates from
//        the frontend's template browser, as a user does; prints the loaded node types and notices.
//   node drive.mjs help URL OUT_DIR NEEDLES.json         open the node help panel for each node
//        ID in NEEDLES.json ({id: text}) and report whether that text is shown.
//   node drive.mjs build URL SPEC.json OUT.json          build a graph from a layout spec with
//        the frontend's own LiteGraph API and save what the frontend serialises (UI format).
//
// No browser is downloaded: playwright-core launches /usr/bin/chromium (CHROMIUM overrides).
// Chromium gets a fresh profile and no background networking (the test machine is offline).

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const VIEWPORT = { width: 1600, height: 1000 };

async function openApp(url) {
  // The first visit of a new user opens the template browser over the canvas; tell the
  // server the tutorial is done so the page comes up on an empty canvas, as for a regular user.
  // The minimap would cover part of the thumbnails.
  for (const [id, value] of [['Comfy.TutorialCompleted', true], ['Comfy.Minimap.Visible', false]]) {
    await fetch(new URL(`/settings/${id}`, url), {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(value),
    });
  }
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'lorarar-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: VIEWPORT,
  });
  const page = context.pages()[0] || await context.newPage();
  const consoleErrors = [];
  page.on('console', (msg) => {
    if (msg.type() === 'error') consoleErrors.push(`${msg.text()} [${msg.location()?.url ?? ''}]`);
  });
  page.on('pageerror', (err) => consoleErrors.push(`pageerror: ${err.message}`));
  await page.goto(url, { waitUntil: 'load', timeout: 120000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).length > 100, null, { timeout: 120000 });
  await page.waitForTimeout(1000);
  // Page functions are sent as source and cannot call each other: install the shared one.
  await page.evaluate(`window.lorararNotices = ${frontendNotices.toString()};`);
  const close = async () => {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return { page, close, consoleErrors };
}

// Runs in the page. What the frontend tells the user, read from its own state rather than from
// one version's DOM. Two generations are known:
//  - "dialogs" (frontend ≤ 1.2x, e.g. the 1.27 that ComfyUI 0.3.64 pins): modal dialogs on the
//    dialog store's stack — "global-load-workflow-warning" (missing node types) and
//    "global-missing-models-warning" (models declared in properties.models / `models` that the
//    server lacks);
//  - "issues-panel" (1.3x+, e.g. 1.58): no modal; the missingNodesError / missingModel stores
//    feed an "N issues found" overlay and the right-side panel's Issues tab, and every node whose
//    model-file combo value is not among its options is drawn with an error outline.
// Anything else on the dialog stack, or any other error the frontend holds, is reported as
// `other` so a test can insist there is none.
function frontendNotices() {
  const stores = document.querySelector('#vue-app')?.__vue_app__?.config?.globalProperties?.$pinia?._s ?? new Map();
  const typeName = (t) => (typeof t === 'string' ? t : t?.type ?? JSON.stringify(t));
  const notices = {
    surface: stores.has('missingModel') ? 'issues-panel' : 'dialogs',
    missingNodeTypes: [],
    missingModels: [],
    errorOverlay: Boolean(stores.get('executionError')?.isErrorOverlayOpen),
    dialogs: [],
    other: [],
  };
  for (const entry of stores.get('dialog')?.dialogStack ?? []) {
    const props = entry.contentProps ?? {};
    notices.dialogs.push(entry.key);
    if (props.missingNodeTypes) notices.missingNodeTypes.push(...props.missingNodeTypes.map(typeName));
    else if (props.missingModels) {
      notices.missingModels.push(...props.missingModels.map((m) => ({ name: m.name, directory: m.directory ?? null, url: m.url ?? null })));
    } else notices.other.push(`dialog ${entry.key}`);
  }
  const nodesError = stores.get('missingNodesError')?.missingNodesError;
  if (nodesError) notices.missingNodeTypes.push(...(nodesError.nodeTypes ?? []).map(typeName));
  for (const c of stores.get('missingModel')?.missingModelCandidates ?? []) {
    if (c.isMissing === true) notices.missingModels.push({ name: c.name, directory: c.directory ?? null, url: c.url ?? null, nodeId: String(c.nodeId) });
    else if (c.isMissing === undefined) notices.other.push(`model check still pending for ${c.name}`);
  }
  const exec = stores.get('executionError');
  for (const key of ['lastNodeErrors', 'lastPromptError', 'lastExecutionError']) {
    const value = exec?.[key];
    if (value && (typeof value !== 'object' || Object.keys(value).length)) notices.other.push(`${key}: ${JSON.stringify(value).slice(0, 300)}`);
  }
  const missingMedia = stores.get('missingMedia')?.missingMediaCandidates;
  if (missingMedia?.length) notices.other.push(`missing media: ${JSON.stringify(missingMedia).slice(0, 300)}`);
  notices.missingNodeTypes = [...new Set(notices.missingNodeTypes)].sort();
  return notices;
}

// Runs in the page: open one workflow file the way Open / drag-and-drop does (app.handleFile),
// wait until the frontend has finished telling the user about it, then collect every sign of a
// broken workflow.
async function loadAndValidate([workflow, fileName]) {
  const registered = window.LiteGraph.registered_node_types;
  const missingTypes = [...new Set(workflow.nodes.map((n) => n.type).filter((t) => !registered[t]))];
  const file = new File([JSON.stringify(workflow)], fileName, { type: 'application/json' });
  await window.app.handleFile(file);
  // Notices appear asynchronously (model checks fetch folder lists): wait until they have
  // settled for 1 s, at most 8 s.
  let last = ''; let stableSince = Date.now();
  for (const start = Date.now(); Date.now() - start < 8000;) {
    await new Promise((r) => setTimeout(r, 100));
    const now = JSON.stringify([window.lorararNotices(), (window.app.graph._nodes ?? window.app.graph.nodes).length]);
    if (now !== last) { last = now; stableSince = Date.now(); } else if (Date.now() - stableSince > 1000) break;
  }
  const graph = window.app.graph;
  const nodes = graph._nodes ?? graph.nodes;
  const report = {
    missingTypes,
    notices: window.lorararNotices(),
    loadedNodes: nodes.length,
    expectedNodes: workflow.nodes.length,
    nodesWithErrors: nodes.filter((n) => n.has_errors).map((n) => `${n.id}:${n.type}`),
    unregisteredLoaded: nodes.filter((n) => !registered[n.type]).map((n) => `${n.id}:${n.type}`),
    badLinks: [],
    links: 0,
  };
  // Nodes as drawn after loading (a frontend grows a node to fit its widgets): title bar
  // included, any two that share area cover each other's widgets.
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  const boxes = nodes.map((n) => ({ id: `${n.id}:${n.type}`, x0: n.pos[0], y0: n.pos[1] - title,
    x1: n.pos[0] + n.size[0], y1: n.pos[1] + n.size[1] }));
  report.boxes = boxes;
  report.overlaps = [];
  for (let i = 0; i < boxes.length; i += 1) {
    for (let j = i + 1; j < boxes.length; j += 1) {
      const a = boxes[i]; const b = boxes[j];
      const w = Math.min(a.x1, b.x1) - Math.max(a.x0, b.x0);
      const h = Math.min(a.y1, b.y1) - Math.max(a.y0, b.y0);
      if (w > 0 && h > 0) report.overlaps.push(`${a.id} and ${b.id} (${Math.round(w)}x${Math.round(h)} px)`);
    }
  }
  const linkList = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {});
  for (const link of linkList) {
    if (!link) continue;
    report.links += 1;
    const from = graph.getNodeById(link.origin_id);
    const to = graph.getNodeById(link.target_id);
    const out = from?.outputs?.[link.origin_slot];
    const inp = to?.inputs?.[link.target_slot];
    const ok = from && to && out && inp && inp.link === link.id
      && (out.links ?? []).includes(link.id)
      && window.LiteGraph.isValidConnection(out.type, inp.type);
    if (!ok) report.badLinks.push({ id: link.id, from: from?.type, out: out?.type, to: to?.type, in: inp?.type });
  }
  try {
    const { output } = await window.app.graphToPrompt();
    report.prompt = output;
    report.promptNodes = Object.keys(output).length;
  } catch (err) {
    report.promptError = String(err?.stack || err);
  }
  return report;
}

// What the user can read on screen, as lines (the canvas itself is not text).
const screenLines = (page) => page.evaluate(() => document.body.innerText.split('\n').map((l) => l.trim()).filter(Boolean));

// The user's next step after a notice: the issues overlay's "View details" (issues-panel
// frontends) opens the Issues tab; dialogs are already open. Returns the text that appeared
// on screen since `before`, i.e. what the user is told.
async function readNotices(page, report, before) {
  if (report.notices.errorOverlay) {
    // "View details" (1.58), "See Errors" (1.4x)
    const details = page.getByRole('button', { name: /^(View details|See Errors)$/ });
    if (await details.count()) await details.first().click({ timeout: 5000 }).catch(() => {});
    else await page.evaluate(() => document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s.get('rightSidePanel')?.openPanel('errors'));
    await page.waitForTimeout(1000);
  }
  const seen = new Set(before);
  return (await screenLines(page)).filter((l) => !seen.has(l));
}

// Close whatever the last workflow opened, so the next one starts from a quiet screen.
async function dismiss(page) {
  await page.evaluate(() => {
    const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
    const dialogs = stores.get('dialog');
    for (const entry of [...(dialogs?.dialogStack ?? [])]) dialogs.closeDialog({ key: entry.key });
    stores.get('rightSidePanel')?.closePanel?.();
    const exec = stores.get('executionError');
    if (exec && 'isErrorOverlayOpen' in exec) exec.isErrorOverlayOpen = false;
  });
  await page.keyboard.press('Escape');
  await page.waitForTimeout(300);
}

async function fitAndShoot(page, file) {
  await page.keyboard.press('Escape');
  // The zoom/fit button bar floats over the canvas; a thumbnail shows only the graph.
  await page.addStyleTag({ content: '.graph-canvas-panel .p-buttongroup { display: none !important; }' });
  await page.evaluate(() => {
    const app = window.app;
    const nodes = app.graph._nodes ?? app.graph.nodes;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const n of nodes) {
      const title = window.LiteGraph.NODE_TITLE_HEIGHT;
      x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
      x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const canvas = app.canvas.canvas;
    const margin = 30;
    const scale = Math.min((canvas.clientWidth - 2 * margin) / (x1 - x0),
      (canvas.clientHeight - 2 * margin) / (y1 - y0), 1.2);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(canvas.clientWidth / scale - (x1 - x0)) / 2 - x0,
      (canvas.clientHeight / scale - (y1 - y0)) / 2 - y0];
    app.canvas.deselectAll?.();
    app.canvas.show_info = false; // the FPS/node-count overlay
    // Below a zoom level LiteGraph draws nodes as bare boxes (no titles, no widgets); a
    // thumbnail of a large workflow is zoomed out that far, so draw it in full.
    if ('min_font_size_for_lod' in app.canvas) app.canvas.min_font_size_for_lod = 0;
    app.canvas.updateLowQualityThreshold?.();
    app.canvas.setDirty(true, true);
  });
  await page.waitForTimeout(800);
  await page.locator('#graph-canvas').screenshot({ path: file });
}

async function check(url, outDir, files) {
  const { page, close, consoleErrors } = await openApp(url);
  const reports = {};
  const frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  try {
    for (const file of files) {
      const workflow = JSON.parse(fs.readFileSync(file, 'utf8'));
      const name = path.basename(file, '.json');
      await dismiss(page);
      const before = await screenLines(page);
      const report = await page.evaluate(loadAndValidate, [workflow, path.basename(file)]);
      if (outDir) {
        // What the user sees right after opening the file, then the canvas for thumbnails.
        report.userScreenshot = path.join(outDir, `${name}.user.png`);
        await page.screenshot({ path: report.userScreenshot });
      }
      report.toldOnScreen = await readNotices(page, report, before);
      if (outDir) {
        report.noticeScreenshot = path.join(outDir, `${name}.notices.png`);
        await page.screenshot({ path: report.noticeScreenshot });
        await dismiss(page);
        report.screenshot = path.join(outDir, `${name}.png`);
        await fitAndShoot(page, report.screenshot);
      }
      reports[name] = report;
    }
  } finally {
    await close();
  }
  return { frontendVersion, reports, consoleErrors };
}

// The node help panel, opened the way each frontend generation offers it for a selected node:
// the selection's help → Node Library help page (nodeHelp store, ≤ 1.2x), or the right-side
// panel's Info tab (1.3x+). `needles` = {nodeId: text of our page that must appear}.
async function help(url, outDir, needles) {
  const { page, close, consoleErrors } = await openApp(url);
  const shown = {};
  try {
    for (const [nodeId, needle] of Object.entries(needles)) {
      await dismiss(page);
      const how = await page.evaluate(async (type) => {
        const { app, LiteGraph } = window;
        app.graph.clear();
        const node = LiteGraph.createNode(type);
        if (!node) return 'not registered';
        app.graph.add(node);
        node.pos = [120, 120];
        app.canvas.selectNode(node);
        const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
        if (stores.get('rightSidePanel')) {
          stores.get('rightSidePanel').openPanel('info');
          return 'right-side panel, Info tab';
        }
        const def = stores.get('nodeDef').nodeDefsByName[type];
        stores.get('nodeHelp').openHelp(def);
        if (stores.get('sidebarTab')?.activeSidebarTabId !== 'node-library') {
          await app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library');
        }
        return 'node library, help page';
      }, nodeId);
      const found = await page.waitForFunction((text) => document.body.innerText.replace(/\s+/g, ' ').includes(text),
        needle, { timeout: 15000 }).then(() => true, () => false);
      const file = path.join(outDir, `help_${nodeId}.png`);
      await page.screenshot({ path: file });
      shown[nodeId] = { how, found, screenshot: file };
      await page.evaluate(() => {
        const stores = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia._s;
        stores.get('nodeHelp')?.closeHelp?.();
      });
    }
  } finally {
    await close();
  }
  return { shown, consoleErrors };
}

// Runs in the page: spec = {nodes: [{key, type, pos, size?, title?, widgets: {name: value}}],
// links: [[fromKey, outputName|index, toKey, inputName]]}.
async function buildInPage(spec) {
  const { app, LiteGraph } = window;
  app.graph.clear();
  const byKey = {};
  for (const s of spec.nodes) {
    const node = LiteGraph.createNode(s.type);
    if (!node) throw new Error(`node type ${s.type} is not registered`);
    if (s.title) node.title = s.title;
    app.graph.add(node);
    node.pos = [...s.pos];
    for (const [name, value] of Object.entries(s.widgets ?? {})) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`${s.type} has no widget ${name}; has ${node.widgets?.map((w) => w.name)}`);
      widget.value = value;
      widget.callback?.(value);
    }
    if (s.color) { node.color = s.color; node.bgcolor = s.bgcolor; }
    // e.g. {models: [{name, url, directory}]}: the frontend offers to download missing models.
    Object.assign(node.properties, s.properties ?? {});
    const min = node.computeSize();
    node.size = s.size ? [Math.max(s.size[0], min[0]), Math.max(s.size[1], min[1])] : min;
    byKey[s.key] = node;
  }
  for (const [fromKey, out, toKey, input] of spec.links) {
    const from = byKey[fromKey]; const to = byKey[toKey];
    const slot = typeof out === 'number' ? out : from.findOutputSlot(out);
    const target = to.findInputSlot(input);
    if (slot < 0 || target < 0) throw new Error(`no slot for ${fromKey}.${out} -> ${toKey}.${input}`);
    if (!from.connect(slot, to, target)) throw new Error(`connect failed: ${fromKey}.${out} -> ${toKey}.${input}`);
  }
  for (const g of spec.groups ?? []) {
    const group = new LiteGraph.LGraphGroup(g.title);
    group.pos = g.pos; group.size = g.size; if (g.color) group.color = g.color;
    app.graph.add(group);
  }
  app.graph.setDirtyCanvas(true, true);
  const { workflow } = await app.graphToPrompt();
  return workflow;
}

async function build(url, specFile, outFile) {
  const spec = JSON.parse(fs.readFileSync(specFile, 'utf8'));
  const { page, close, consoleErrors } = await openApp(url);
  try {
    const workflow = await page.evaluate(buildInPage, spec);
    delete workflow.id; // a fresh id is made per saved copy; templates don't need one
    fs.writeFileSync(outFile, `${JSON.stringify(workflow, null, 2)}\n`);
    return { written: outFile, nodes: workflow.nodes.length, links: workflow.links.length, consoleErrors };
  } finally {
    await close();
  }
}

// The user's path to a template: Workflow → Browse Templates → Custom Nodes → <pack> → card.
async function template(url, pack, names) {
  const { page, close, consoleErrors } = await openApp(url);
  const result = { cards: {}, loaded: {} };
  try {
    for (const name of names) {
      // An empty canvas first, so "nodes appeared" below means this template has loaded.
      await page.evaluate(() => window.app.graph.clear());
      await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
      await page.getByText(pack, { exact: true }).click({ timeout: 30000 });
      const card = page.getByText(name, { exact: true }).first();
      await card.waitFor({ timeout: 30000 });
      result.cards[name] = await card.isVisible();
      await card.click();
      await page.waitForFunction(() => (window.app.graph._nodes ?? window.app.graph.nodes).length > 0, null, { timeout: 30000 });
      await page.waitForTimeout(2500); // the model checks run after the graph is configured
      result.loaded[name] = {
        types: await page.evaluate(() => (window.app.graph._nodes ?? window.app.graph.nodes).map((n) => n.type).sort()),
        notices: await page.evaluate(() => window.lorararNotices()),
      };
      await dismiss(page);
    }
  } finally {
    await close();
  }
  return { ...result, consoleErrors };
}

// Runs in the page after buildInPage: queue the graph as the Run button does, wait until the
// server's queue is empty, then read what the user sees: the text each node shows (ComfyUI's
// progress-text box, `$$node-text-preview`, which both frontend generations draw on the node).
async function queueAndRead(timeoutMs) {
  const { app } = window;
  const before = await (await fetch('/history?max_items=1000')).json();
  await app.queuePrompt(0, 1);
  const start = Date.now();
  let history = {};
  for (;;) {
    await new Promise((r) => setTimeout(r, 300));
    const queue = await (await fetch('/queue')).json();
    history = await (await fetch('/history?max_items=1000')).json();
    const fresh = Object.keys(history).filter((id) => !(id in before));
    if (fresh.length && !queue.queue_running.length && !queue.queue_pending.length) {
      history = history[fresh[0]];
      break;
    }
    if (Date.now() - start > timeoutMs) throw new Error('the prompt did not finish in time');
  }
  await new Promise((r) => setTimeout(r, 1500)); // the last websocket messages reach the canvas
  // the node's own text box, or, for core's Preview Any, its text widget (kept after the run)
  const texts = {};
  for (const node of app.graph._nodes ?? app.graph.nodes) {
    const widget = node.widgets?.find((w) => w.name === '$$node-text-preview')
      // Preview Any's text box: 'preview' in 1.2x-1.4x, 'preview_text' in 1.5x
      ?? (node.type === 'PreviewAny' ? node.widgets?.find((w) => ['preview', 'preview_text'].includes(w.name)) : undefined);
    if (widget && widget.value) texts[node.title] = String(widget.value);
  }
  return { texts, status: history.status?.status_str ?? null,
    errors: (history.status?.messages ?? []).filter((m) => m[0] === 'execution_error').map((m) => m[1]) };
}

//   node drive.mjs run URL OUT_DIR SPEC.json          build the spec's graph, press Run, report the
//        text every node shows and the run's status; OUT_DIR gets run.png (the screen after it)
//        and, where the frontend reports an error, error.png after opening its details.
async function run(url, outDir, specFile) {
  const spec = JSON.parse(fs.readFileSync(specFile, 'utf8'));
  const { page, close, consoleErrors } = await openApp(url);
  try {
    // built, then opened as a user opens a workflow file, so the run belongs to a workflow tab
    // (1.5x files a job's errors under its workflow)
    const workflow = await page.evaluate(buildInPage, spec);
    await page.evaluate(async (wf) => {
      await window.app.handleFile(new File([JSON.stringify(wf)], 'lorarar_run.json', { type: 'application/json' }));
    }, workflow);
    await page.waitForTimeout(1500);
    const before = await screenLines(page);
    const result = await page.evaluate(queueAndRead, 300000);
    await page.screenshot({ path: path.join(outDir, 'run.png') });
    result.notices = await page.evaluate(() => window.lorararNotices());
    // the execution error as the frontend holds it (what its error panel and report render)
    result.frontendError = await page.evaluate(() => {
      const stores = document.querySelector('#vue-app')?.__vue_app__?.config?.globalProperties?.$pinia?._s;
      const error = stores?.get('executionError')?.lastExecutionError;
      return error ? { type: error.exception_type, message: error.exception_message } : null;
    });
    // what the user reads about an error: the dialog (1.2x) or the panel "View details" opens (1.5x)
    result.toldOnScreen = await readNotices(page, { notices: { errorOverlay: true } }, before);
    await page.screenshot({ path: path.join(outDir, 'error.png') });
    return { ...result, consoleErrors };
  } finally {
    await close();
  }
}

const [mode, url, ...rest] = process.argv.slice(2);
let result;
if (mode === 'check') result = await check(url, rest[0] === '-' ? null : rest[0], rest.slice(1));
else if (mode === 'build') result = await build(url, rest[0], rest[1]);
else if (mode === 'template') result = await template(url, rest[0], rest.slice(1));
else if (mode === 'help') result = await help(url, rest[0], JSON.parse(fs.readFileSync(rest[1], 'utf8')));
else if (mode === 'run') result = await run(url, rest[0], rest[1]);
else {
  console.error('usage: drive.mjs check URL OUT_DIR|- FILE... | template URL PACK NAME... | help URL OUT_DIR NEEDLES.json | build URL SPEC OUT | run URL OUT_DIR SPEC');
  process.exit(2);
}
process.stdout.write(`${JSON.stringify(result)}\n`);
