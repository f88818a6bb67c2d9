"""The JavaScript the frontend test runs in the ComfyUI page (tests/test_frontend.py)."""

# Installed once per page: a MutationObserver recording every toast and dialog the app shows, and an
# extension whose afterConfigureGraph hook receives the app's own list of missing node types.
INSTRUMENT_JS = r"""
() => {
  if (window.__tf) return true;
  const tf = window.__tf = {events: [], missing: null, loads: 0};
  const severity = (el) => (String(el.className).match(/p-toast-message-(\w+)/) || [])[1] || 'unknown';
  const record = (el) => {
    if (!(el instanceof Element)) return;
    const found = [];
    if (el.matches('.p-toast-message')) found.push(el);
    found.push(...el.querySelectorAll('.p-toast-message'));
    for (const t of found) tf.events.push({kind: 'toast', severity: severity(t), text: t.innerText.slice(0, 500)});
    const dialogs = [];
    if (el.matches('.global-dialog')) dialogs.push(el);
    dialogs.push(...el.querySelectorAll('.global-dialog'));
    for (const d of dialogs) tf.events.push({kind: 'dialog', key: d.getAttribute('aria-labelledby'),
                                             text: d.innerText.slice(0, 500)});
  };
  new MutationObserver((mutations) => {
    for (const m of mutations) for (const n of m.addedNodes) record(n);
  }).observe(document.body, {childList: true, subtree: true});
  window.app.registerExtension({
    name: 'TokenFlow.FrontendTest',
    afterConfigureGraph(missingNodeTypes) { tf.missing = JSON.parse(JSON.stringify(missingNodeTypes || [])); },
  });
  return true;
}
"""

OPEN_DIALOGS_JS = r"""
() => [...document.querySelectorAll('.global-dialog')]
  .filter((d) => d.offsetParent !== null || d.getClientRects().length)
  .map((d) => ({key: d.getAttribute('aria-labelledby'), text: d.innerText.slice(0, 500)}))
"""

# Drop the workflow file on the canvas (the app's document-level drop handler takes it from there),
# wait for the app's loadGraphData to finish, then report what the app made of it.
DROP_AND_INSPECT_JS = r"""
async ({text, fileName, timeoutMs}) => {
  const app = window.app, tf = window.__tf;
  tf.missing = null;
  const original = app.loadGraphData;
  let settle;
  const loaded = new Promise((resolve) => { settle = resolve; });
  app.loadGraphData = async function (...args) {
    try { return await original.apply(this, args); }
    catch (error) { tf.loadError = String(error && error.stack || error); throw error; }
    finally { app.loadGraphData = original; settle(true); }
  };
  try {
    const transfer = new DataTransfer();
    transfer.items.add(new File([text], fileName, {type: 'application/json'}));
    const canvas = document.querySelector('#graph-canvas') || document.body;
    canvas.dispatchEvent(new DragEvent('drop', {bubbles: true, cancelable: true, dataTransfer: transfer}));
    const ok = await Promise.race([loaded, new Promise((r) => setTimeout(() => r(false), timeoutMs))]);
    if (!ok) return {error: `the app did not load the dropped file within ${timeoutMs} ms`};
  } finally {
    app.loadGraphData = original;
  }
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));

  const wf = JSON.parse(text);
  const registered = (type) => type in LiteGraph.registered_node_types;
  const savedNodes = [...(wf.nodes || [])];
  for (const sg of (wf.definitions && wf.definitions.subgraphs) || []) savedNodes.push(...(sg.nodes || []));
  const unregistered = [...new Set(savedNodes.map((n) => n.type).filter((t) => !registered(t)))];
  const savedById = new Map((wf.nodes || []).map((n) => [String(n.id), n]));

  const problems = [];
  const nodes = [];
  const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
  for (const node of app.graph.nodes) {
    const where = `node ${node.id} (${node.type}${node.title && node.title !== node.type ? ` "${node.title}"` : ''})`;
    if (!registered(node.type)) problems.push(`${where}: type not registered in LiteGraph`);
    if (node.has_errors) problems.push(`${where}: has_errors is set`);
    const widgets = [];
    for (const w of node.widgets || []) {
      const o = w.options || {};
      const entry = {name: w.name, type: w.type, value: w.value};
      widgets.push(entry);
      const bad = (why) => problems.push(`${where}: widget '${w.name}' = ${JSON.stringify(w.value)}: ${why}`);
      if (w.type === 'combo') {
        let values = o.values;
        if (typeof values === 'function') values = values(w, node);
        if (values && !Array.isArray(values) && typeof values === 'object') values = Object.keys(values);
        entry.options = Array.isArray(values) ? values.slice(0, 50) : values;
        if (!Array.isArray(values)) bad('combo without a list of options');
        else if (!values.includes(w.value)) bad(`not among the options ${JSON.stringify(values.slice(0, 20))}`);
      } else if (w.type === 'number' || w.type === 'slider') {
        entry.min = o.min; entry.max = o.max;
        if (typeof w.value !== 'number' || !Number.isFinite(w.value)) bad('not a finite number');
        else if (o.min != null && w.value < o.min) bad(`below min ${o.min}`);
        else if (o.max != null && w.value > o.max) bad(`above max ${o.max}`);
      } else if (w.type === 'toggle' || w.type === 'boolean') {
        if (typeof w.value !== 'boolean') bad('not a boolean');
      } else if (w.type === 'text' || w.type === 'customtext' || w.type === 'string') {
        if (typeof w.value !== 'string') bad('not a string');
      }
    }
    const saved = savedById.get(String(node.id));
    if (!saved) problems.push(`${where}: not in the workflow file`);
    else if (saved.widgets_values !== undefined) {
      const kept = node.serialize().widgets_values;
      if (!same(kept, saved.widgets_values))
        problems.push(`${where}: widgets_values changed on load: saved ${JSON.stringify(saved.widgets_values)}, ` +
                      `frontend has ${JSON.stringify(kept)}`);
    }
    nodes.push({id: node.id, type: node.type, mode: node.mode, widgets});
  }
  if (app.graph.nodes.length !== (wf.nodes || []).length)
    problems.push(`the graph has ${app.graph.nodes.length} nodes, the file ${(wf.nodes || []).length}`);
  const links = app.graph.links instanceof Map ? app.graph.links.size : Object.keys(app.graph.links || {}).length;
  return {missing: tf.missing, unregistered, problems, nodes, links, loadError: tf.loadError || null,
          savedLinks: (wf.links || []).length};
}
"""


# Test-time overrides, typed into the widgets after the checks (the files keep the official settings):
# 64x64 frames, 5 of them (3 for strided loaders, stride at most 2), 2 editing / 4 inversion steps,
# frame and propagation batches of 2, 2 KSampler steps. The same as tests/test_server_workflows.py.
TINY_OVERRIDES_JS = r"""
() => {
  const changed = [];
  const set = (node, name, value) => {
    const w = (node.widgets || []).find((w) => w.name === name);
    if (!w) return;
    const v = typeof value === 'function' ? value(w.value) : value;
    if (w.value !== v) { changed.push(`${node.id}.${name}: ${w.value} -> ${v}`); w.value = v; }
  };
  for (const node of window.app.graph.nodes) {
    switch (node.type) {
      case 'TokenFlowLoadVideo': {
        const nth = (node.widgets.find((w) => w.name === 'select_every_nth') || {}).value || 1;
        set(node, 'width', 64); set(node, 'height', 64);
        set(node, 'frame_load_cap', nth > 1 ? 3 : 5); set(node, 'select_every_nth', Math.min(nth, 2));
        break;
      }
      case 'TokenFlowInvert':
        set(node, 'steps', 2); set(node, 'inversion_steps', 4); set(node, 'frame_batch', 2); break;
      case 'TokenFlowExtractCorrespondences': case 'TokenFlowSampler':
        set(node, 'batch_size', 2); break;
      case 'KSampler': case 'KSamplerAdvanced':
        set(node, 'steps', 2); break;
      case 'ModelSamplingFlux':
        set(node, 'width', 64); set(node, 'height', 64); break;
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
  return changed;
}
"""

# The Flux example's core loaders (UNETLoader, DualCLIPLoader, VAELoader) -> one CheckpointLoaderSimple of the tiny
# all-in-one Flux checkpoint (arg), every link moved to the matching output (MODEL 0, CLIP 1, VAE 2), the loaders
# removed: DualCLIPLoader cannot load a tiny text encoder (tests/test_dit_server.py says why). Returns the moves.
FLUX_LOADERS_TO_CHECKPOINT_JS = r"""
(ckptName) => {
  const g = window.app.graph;
  const slot = { UNETLoader: 0, DualCLIPLoader: 1, VAELoader: 2 };
  const loaders = g.nodes.filter((n) => n.type in slot);
  if (!loaders.length) return [];
  const link = (id) => (g.links instanceof Map ? g.links.get(id) : g.links[id]);
  const checkpoint = window.LiteGraph.createNode('CheckpointLoaderSimple');
  checkpoint.pos = [...loaders[0].pos];
  g.add(checkpoint);
  checkpoint.widgets.find((w) => w.name === 'ckpt_name').value = ckptName;
  const moved = [];
  for (const node of loaders) {
    const targets = (node.outputs[0].links || []).map(link).map((l) => [l.target_id, l.target_slot]);
    for (const [targetId, targetSlot] of targets) {
      checkpoint.connect(slot[node.type], g.getNodeById(targetId), targetSlot);
      moved.push(`${node.type} -> ${targetId}.${targetSlot}`);
    }
  }
  for (const node of loaders) g.remove(node);
  g.setDirtyCanvas(true, true);
  return moved;
}
"""

EVENTS_JS = "() => window.__tf.events"

# What the user sees when a workflow opens, measured in the page after the drop (tests/test_frontend.py): the zoom
# and whether the canvas draws text at it (the frontend's own low_quality decision, from its default font-size
# threshold), the "Read me" note on screen and not covered by the app's bars (elementFromPoint at 3x3 points of its
# title bar and body hits the canvas or the note's own text element), the note's text whole (no scrolling inside
# it), every title uncut (measured with the title font, the room the frontend's computeSize gives a title), no node
# resized by the frontend on loading (``savedSizes``: node id -> the file's size), and every node inside one group.
OPENED_VIEW_JS = r"""
(savedSizes) => {
  const app = window.app, c = app.canvas, graph = app.graph;
  const rect = c.canvas.getBoundingClientRect();
  const [ox, oy] = c.ds.offset, scale = c.ds.scale, TITLE = LiteGraph.NODE_TITLE_HEIGHT;
  const toPage = (x, y) => [rect.left + (x + ox) * scale, rect.top + (y + oy) * scale];
  const problems = [];
  const view = {scale, offset: [ox, oy], lowQuality: c.low_quality, threshold: c._lowQualityZoomThreshold ?? null,
                minFontSizeForLod: c.min_font_size_for_lod ?? null, nodeTextSize: LiteGraph.NODE_TEXT_SIZE,
                devicePixelRatio: window.devicePixelRatio, window: [innerWidth, innerHeight],
                canvasRect: [rect.left, rect.top, rect.width, rect.height]};
  const notes = graph.nodes.filter((n) => n.type === 'MarkdownNote' || n.type === 'Note');
  if (notes.length !== 1) problems.push(`${notes.length} notes, expected the one Read me note`);
  for (const note of notes) {
    const [x0, y0] = toPage(note.pos[0], note.pos[1] - TITLE);
    const [x1, y1] = toPage(note.pos[0] + note.size[0], note.pos[1] + note.size[1]);
    view.note = [Math.round(x0), Math.round(y0), Math.round(x1), Math.round(y1)];
    const own = (note.widgets || []).map((w) => w.element || w.inputEl).filter(Boolean);
    for (const fy of [0.02, 0.5, 0.98]) for (const fx of [0.02, 0.5, 0.98]) {
      const x = x0 + fx * (x1 - x0), y = y0 + fy * (y1 - y0);
      if (x < 0 || y < 0 || x >= innerWidth || y >= innerHeight) {
        problems.push(`the note's point (${Math.round(x)}, ${Math.round(y)}) is outside the window`); continue;
      }
      const hit = document.elementFromPoint(x, y);
      if (hit !== c.canvas && !own.some((el) => el.contains(hit)))
        problems.push(`the note's point (${Math.round(x)}, ${Math.round(y)}) is covered by ` +
                      `<${hit && hit.tagName.toLowerCase()} class="${hit && String(hit.className).slice(0, 80)}">`);
    }
    for (const el of own) {
      const style = getComputedStyle(el);
      if (style.display === 'none' || style.visibility === 'hidden' || !el.getClientRects().length)
        problems.push('the note\'s text element is not shown');
      let bottom = el.getBoundingClientRect().top;
      const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
      for (let text = walker.nextNode(); text; text = walker.nextNode()) {
        const range = document.createRange();
        range.selectNodeContents(text);
        bottom = Math.max(bottom, range.getBoundingClientRect().bottom);
      }
      view.noteText = [Math.round(bottom - el.getBoundingClientRect().top), el.clientHeight];  // screen px: text, room
      if (el.scrollHeight > el.clientHeight + 2)
        problems.push(`the note's text needs scrolling: ${el.scrollHeight} px of text in ${el.clientHeight} px`);
    }
  }
  const ctx = document.createElement('canvas').getContext('2d');
  const groups = graph._groups || graph.groups || [];
  for (const node of graph.nodes) {
    const title = node.getTitle ? node.getTitle() : node.title;
    ctx.font = node.titleFontStyle || `${LiteGraph.NODE_TEXT_SIZE}px ${LiteGraph.NODE_FONT}`;
    const needs = TITLE + ctx.measureText(title).width + TITLE * 0.33;
    const where = `node ${node.id} "${title}"`;
    if (needs > node.size[0] + 0.5)
      problems.push(`${where}: title cut (needs ${Math.round(needs)} px, the node is ${Math.round(node.size[0])})`);
    const saved = savedSizes[String(node.id)];  // newer frontends widen a node its title or widgets do not fit
    if (saved && (node.size[0] > saved[0] + 0.5 || node.size[1] > saved[1] + 0.5))
      problems.push(`${where}: the frontend resized it on loading from ${saved} to ${node.size.map(Math.round)}`);
    if (notes.includes(node)) continue;
    const inside = groups.filter((g) => {
      const [gx, gy, gw, gh] = g._bounding || g.bounding;
      return gx <= node.pos[0] && node.pos[0] + node.size[0] <= gx + gw && gy <= node.pos[1] - TITLE &&
             node.pos[1] + node.size[1] <= gy + gh;
    });
    if (inside.length !== 1) problems.push(`${where}: inside ${inside.length} group frames, expected 1`);
  }
  return {view, problems};
}
"""

# After a run: the text each Preview Any node shows (its "preview" widgets, as the frontend's PreviewAny extension
# sets them from the node's executed message), by node id and title.
PREVIEW_TEXTS_JS = r"""
() => Object.fromEntries(window.app.graph.nodes.filter((n) => n.type === 'PreviewAny').map((n) => [
  `${n.id} ${n.getTitle ? n.getTitle() : n.title}`,
  (n.widgets || []).filter((w) => w.name === 'preview').map((w) => w.value)]))
"""

# Puts the view on the first group whose title starts with the argument (at the saved zoom, its top left where the
# Read me note opens) so a screenshot shows it.
SHOW_GROUP_JS = r"""
(title) => {
  const c = window.app.canvas, graph = window.app.graph;
  const group = (graph._groups || graph.groups || []).find((g) => g.title.startsWith(title));
  if (!group) return false;
  const [x, y] = group._bounding || group.bounding;
  c.ds.offset[0] = 80 / c.ds.scale - x;
  c.ds.offset[1] = 110 / c.ds.scale - y;
  c.setDirty(true, true);
  return true;
}
"""
