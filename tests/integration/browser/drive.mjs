// Drives the real ComfyUI frontend (served by a real ComfyUI server) in Debian's headless
// Chromium, for tests/integration/test_browser.py and for (re)building example_workflows/.
//
//   node drive.mjs check URL OUT_DIR WORKFLOW.json...   load each workflow as a user would,
//        validate it, screenshot the canvas to OUT_DIR/<name>.png; prints one JSON report.
//        SHOW_MISSING_MODELS=1 lets the missing-models dialog open (off: models are absent here).
//   node drive.mjs template URL PACK NAME...           open each of the pack's templates from
//        the frontend's template browser, as a user does; prints the loaded node types.
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
  const close = async () => {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return { page, close, consoleErrors };
}

// Runs in the page: load one workflow the way "Open" / drag-and-drop does, then collect every
// sign of a broken workflow.
async function loadAndValidate([workflow, showModels]) {
  const visibleDialogs = () => [...document.querySelectorAll('.p-dialog')]
    .filter((d) => d.offsetParent !== null || d.getClientRects().length)
    .map((d) => d.innerText.trim().slice(0, 500));
  const registered = window.LiteGraph.registered_node_types;
  const missingTypes = [...new Set(workflow.nodes.map((n) => n.type).filter((t) => !registered[t]))];
  await window.app.loadGraphData(structuredClone(workflow), true, true, null,
    { showMissingNodesDialog: true, showMissingModelsDialog: showModels });
  // Dialogs open asynchronously; when a type is missing, give the warning time to appear.
  const expectDialog = missingTypes.length > 0 || showModels;
  for (let waited = 0; waited < (expectDialog ? 5000 : 700); waited += 100) {
    await new Promise((r) => setTimeout(r, 100));
    if (expectDialog && visibleDialogs().length) break;
  }
  const graph = window.app.graph;
  const nodes = graph._nodes ?? graph.nodes;
  const report = {
    missingTypes,
    dialogs: visibleDialogs(),
    loadedNodes: nodes.length,
    expectedNodes: workflow.nodes.length,
    nodesWithErrors: nodes.filter((n) => n.has_errors).map((n) => `${n.id}:${n.type}`),
    unregisteredLoaded: nodes.filter((n) => !registered[n.type]).map((n) => `${n.id}:${n.type}`),
    badLinks: [],
    links: 0,
  };
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
      const report = await page.evaluate(loadAndValidate, [workflow, process.env.SHOW_MISSING_MODELS === '1']);
      if (outDir) {
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
      await page.waitForFunction((n) => (window.app.graph._nodes ?? window.app.graph.nodes).length > 0
        && !document.querySelector('.p-dialog')?.innerText.includes('Get Started'), name, { timeout: 30000 });
      await page.waitForTimeout(1000);
      result.loaded[name] = await page.evaluate(() => ({
        types: (window.app.graph._nodes ?? window.app.graph.nodes).map((n) => n.type).sort(),
        dialogs: [...document.querySelectorAll('.p-dialog')].map((d) => d.innerText.trim().slice(0, 500)),
      }));
      await page.keyboard.press('Escape');
    }
  } finally {
    await close();
  }
  return { ...result, consoleErrors };
}

const [mode, url, ...rest] = process.argv.slice(2);
let result;
if (mode === 'check') result = await check(url, rest[0] === '-' ? null : rest[0], rest.slice(1));
else if (mode === 'build') result = await build(url, rest[0], rest[1]);
else if (mode === 'template') result = await template(url, rest[0], rest.slice(1));
else { console.error('usage: drive.mjs check URL OUT_DIR|- FILE... | build URL SPEC OUT'); process.exit(2); }
process.stdout.write(`${JSON.stringify(result)}\n`);
