// The segment and theta editor drawn on PeRFlow Settings (issue 11). It keeps no state of its own: it reads the
// node's `segments`, `boundaries` and `theta` widgets, draws them, and writes every edit back into them, so saved
// workflows and API prompts carry the same three values as without it. The preview step count is the node
// property "preview steps" (saved with the workflow, never sent to the server).
import {
  T,
  THETA_COLUMNS,
  formatBoundaries,
  formatTheta,
  hasRepeats,
  parseBoundaries,
  parseTheta,
  resizeTheta,
  timestepGrid,
  uniformBoundaries,
  windowTimes,
} from "./perflow_segments.js";

const { app } = window.comfyAPI.app;

const NODE_TYPE = "PerflowSettings";
const PREVIEW_PROPERTY = "preview steps";
const DEFAULT_PREVIEW_STEPS = 8;
const DEFAULT_SEGMENTS = 4;
const SVG_NS = "http://www.w3.org/2000/svg";
const EDITOR_HEIGHT = 262;
const EDITOR_MIN_WIDTH = 360;
const PLOT_HEIGHT = 156;
const MARGIN = 14;
const THETA_STEP = 0.01;
const GRIP_HALF_WIDTH = 5;
const DOUBLE_CLICK_MS = 450;
const WINDOW_BAND_BOTTOM = 90; // double-clicks above this split a window (below are the theta bars)
const THETA_ZERO_Y = 128;
const THETA_HALF_HEIGHT = 22;
const COLUMN_COLOURS = ["#e0a030", "#4fa0e0", "#b070e0"];
const WINDOW_COLOURS = ["#2f4f3f", "#3f3f5f"];

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function svg(tag, attributes = {}, parent = null) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  parent?.appendChild(element);
  return element;
}

function html(tag, attributes = {}, parent = null) {
  const element = document.createElement(tag);
  Object.assign(element, attributes);
  parent?.appendChild(element);
  return element;
}

function roundTheta(value) {
  return Math.round(value / THETA_STEP) / Math.round(1 / THETA_STEP) || 0; // to THETA_STEP, never -0
}

/** What the three widgets say: K, boundaries (null: uniform), theta rows, and the problem when they cannot be read. */
function readState(node) {
  const segments = Number(widget(node, "segments")?.value ?? DEFAULT_SEGMENTS);
  const boundaries = parseBoundaries(widget(node, "boundaries")?.value ?? "");
  if (boundaries.error) return { k: segments, values: null, rows: resizeTheta([], segments), error: boundaries.error };
  const k = boundaries.values ? boundaries.values.length - 1 : segments;
  const theta = parseTheta(widget(node, "theta")?.value ?? "", k);
  const disagree = boundaries.values && k !== segments ? `segments is ${segments} but boundaries make ${k} segments; an edit here sets segments to ${k}` : null;
  return { k, values: boundaries.values, rows: theta.rows ?? resizeTheta([], k), error: theta.error ?? null, warning: disagree };
}

class SegmentEditor {
  constructor(node) {
    this.node = node;
    this.selected = 0;
    this.drag = null;
    this.root = html("div", { className: "perflow-segment-editor" });
    Object.assign(this.root.style, { display: "flex", flexDirection: "column", gap: "3px", font: "11px sans-serif", color: "#ddd", cursor: "default", width: "100%", height: "100%", boxSizing: "border-box" });
    // The editor handles its own presses and drags; the canvas (or the Vue node around it) must not see them, or it
    // drags the node. Moves that are not the editor's own drag pass (e.g. a link or node dragged across it).
    for (const type of ["pointerdown", "mousedown", "click", "dblclick", "contextmenu"]) {
      this.root.addEventListener(type, (event) => event.stopPropagation());
    }
    for (const type of ["pointermove", "pointerup", "mousemove", "mouseup"]) {
      this.root.addEventListener(type, (event) => this.drag && event.stopPropagation());
    }
    this.plot = svg("svg", { height: PLOT_HEIGHT, "data-perflow": "plot" }, this.root);
    Object.assign(this.plot.style, { width: "100%", height: `${PLOT_HEIGHT}px`, flex: "none", background: "#1c1c1c", borderRadius: "4px", touchAction: "none", userSelect: "none" });
    this.plot.addEventListener("pointerdown", (event) => this.onPointerDown(event));
    this.plot.addEventListener("pointermove", (event) => this.onPointerMove(event));
    this.plot.addEventListener("pointerup", (event) => this.onPointerUp(event));
    this.buildControls();
    this.lastKey = null;
  }

  buildControls() {
    const thetaRow = html("div", {}, this.root);
    Object.assign(thetaRow.style, { display: "flex", gap: "4px", alignItems: "center" });
    this.windowLabel = html("span", { className: "perflow-window-label" }, thetaRow);
    this.windowLabel.style.whiteSpace = "nowrap";
    this.thetaInputs = THETA_COLUMNS.map((name, column) => {
      const input = html("input", { type: "number", step: String(THETA_STEP), title: `theta ${name} of the selected window`, className: "perflow-theta-input" }, thetaRow);
      input.dataset.column = String(column);
      Object.assign(input.style, { width: "64px", background: "#222", color: COLUMN_COLOURS[column], border: "1px solid #555", borderRadius: "3px" });
      input.addEventListener("change", () => this.typeTheta(column, input.value));
      input.addEventListener("keydown", (event) => event.stopPropagation());
      return input;
    });
    const stepRow = html("div", {}, this.root);
    Object.assign(stepRow.style, { display: "flex", gap: "4px", alignItems: "center" });
    html("span", { textContent: "preview steps" }, stepRow);
    this.stepsInput = html("input", { type: "number", min: "1", max: "999", step: "1", title: "Step count of the grid drawn (not sent to the server)", className: "perflow-preview-steps" }, stepRow);
    Object.assign(this.stepsInput.style, { width: "52px", background: "#222", color: "#ddd", border: "1px solid #555", borderRadius: "3px" });
    this.stepsInput.addEventListener("change", () => this.setPreviewSteps(this.stepsInput.value));
    this.stepsInput.addEventListener("keydown", (event) => event.stopPropagation());
    this.reset = html("button", { textContent: "Reset to the original", title: "K = 4 uniform segments, theta = 0", className: "perflow-reset" }, stepRow);
    Object.assign(this.reset.style, { marginLeft: "auto", background: "#333", color: "#ddd", border: "1px solid #555", borderRadius: "3px", cursor: "pointer" });
    this.reset.addEventListener("click", () => this.resetToOriginal());
    this.message = html("div", { className: "perflow-editor-message" }, this.root);
    Object.assign(this.message.style, { flex: "none", minHeight: "28px", lineHeight: "14px", color: "#aaa", overflow: "hidden" });
  }

  get previewSteps() {
    const steps = Number(this.node.properties?.[PREVIEW_PROPERTY]);
    return Number.isInteger(steps) && steps >= 1 ? steps : DEFAULT_PREVIEW_STEPS;
  }

  setPreviewSteps(value) {
    const steps = Math.round(Number(value));
    if (Number.isFinite(steps) && steps >= 1) this.node.properties[PREVIEW_PROPERTY] = Math.min(steps, 999);
    recordUndoStep(); // a property saved with the workflow: the tracker ignores keys typed into inputs
    this.render(true);
  }

  // geometry -----------------------------------------------------------------------------------------
  measureWidth() {
    return this.plot.clientWidth > 0 ? this.plot.clientWidth : EDITOR_MIN_WIDTH;
  }

  x(timestep) {
    return MARGIN + ((T - timestep) / T) * (this.width - 2 * MARGIN);
  }

  /** A pointer event's place in the plot: its timestep and its height in plot units (through the canvas zoom's CSS
   * transform and the viewBox). */
  eventPoint(event) {
    const point = new DOMPoint(event.clientX, event.clientY).matrixTransform(this.plot.getScreenCTM().inverse());
    return { timestep: T - ((point.x - MARGIN) / (this.width - 2 * MARGIN)) * T, y: point.y };
  }

  // writing the widgets --------------------------------------------------------------------------------
  /** Write K, the boundaries (null: K equal windows; undefined: leave the text as typed) and theta (null: leave
   * the text as typed). */
  write(k, values, rows) {
    this.writing = true;
    try {
      setWidgetValue(this.node, "segments", k);
      if (values !== undefined) setWidgetValue(this.node, "boundaries", values ? formatBoundaries(values) : "");
      if (rows) setWidgetValue(this.node, "theta", formatTheta(rows));
    } finally {
      this.writing = false;
    }
    this.node.setDirtyCanvas?.(true, true);
    if (!this.drag) recordUndoStep();
    this.render(true);
  }

  editable() {
    const state = readState(this.node);
    if (state.error) {
      this.render(true);
      return null;
    }
    // integer boundaries from the first edit on (K equal windows have fractional ones where K does not divide T)
    return { ...state, values: (state.values ?? uniformBoundaries(state.k)).map(Math.round) };
  }

  resetToOriginal() {
    this.selected = 0;
    this.write(DEFAULT_SEGMENTS, null, resizeTheta([], DEFAULT_SEGMENTS));
  }

  typeTheta(column, text) {
    const state = this.editable();
    const value = Number(text);
    if (!state || text === "" || !Number.isFinite(value)) return this.render(true);
    const rows = state.rows.map((row) => [...row]);
    rows[Math.min(this.selected, state.k - 1)][column] = value;
    this.write(state.k, state.values, rows);
  }

  // pointer input ----------------------------------------------------------------------------------------
  onPointerDown(event) {
    const target = event.target;
    if (event.button !== 0) return;
    if (this.isSecondClick(event)) return this.onDoubleClick(event);
    const state = this.editable();
    if (!state) return;
    if (target.dataset.boundary) {
      this.drag = { kind: "boundary", index: Number(target.dataset.boundary), state };
    } else if (target.dataset.thetaWindow) {
      const k = Number(target.dataset.thetaWindow);
      const column = Number(target.dataset.thetaColumn);
      this.selected = k;
      this.drag = { kind: "theta", k, column, state, startY: this.eventPoint(event).y, startValue: state.rows[k][column], scale: this.thetaScale(state.rows) };
    } else if (target.dataset.window) {
      this.selected = Number(target.dataset.window);
      this.render(true);
      return;
    } else {
      return;
    }
    this.plot.setPointerCapture?.(event.pointerId); // no preventDefault: it would cancel the double-click that merges
  }

  onPointerMove(event) {
    if (!this.drag) return;
    this.lastPress = null; // a drag is no first click of a double-click
    const { state } = this.drag;
    if (this.drag.kind === "boundary") {
      const i = this.drag.index;
      const values = [...state.values];
      values[i] = Math.min(values[i - 1] - 1, Math.max(values[i + 1] + 1, Math.round(this.eventPoint(event).timestep)));
      this.write(state.k, values, state.rows);
    } else {
      const rows = state.rows.map((row) => [...row]);
      const dy = this.drag.startY - this.eventPoint(event).y;
      rows[this.drag.k][this.drag.column] = roundTheta(this.drag.startValue + (dy / THETA_HALF_HEIGHT) * this.drag.scale);
      this.write(state.k, state.values, rows);
    }
  }

  onPointerUp(event) {
    if (!this.drag) return;
    event.stopPropagation(); // the drag's end, like its moves, is the editor's
    this.plot.releasePointerCapture?.(event.pointerId);
    this.drag = null;
    recordUndoStep();
    this.render(true);
  }

  /** Double-clicks are detected here: the browser's dblclick never comes when the first click was captured for a drag. */
  isSecondClick(event) {
    const last = this.lastPress;
    const second = last && event.timeStamp - last.time < DOUBLE_CLICK_MS && Math.hypot(event.clientX - last.x, event.clientY - last.y) < 6;
    this.lastPress = second ? null : { time: event.timeStamp, x: event.clientX, y: event.clientY };
    return second;
  }

  onDoubleClick(event) {
    const state = this.editable();
    if (!state) return;
    // by position: the first click may have redrawn the plot
    const { timestep, y } = this.eventPoint(event);
    const pixels = (this.width - 2 * MARGIN) / T;
    const near = state.values.findIndex((value, i) => i > 0 && i < state.k && Math.abs(value - timestep) * pixels <= GRIP_HALF_WIDTH);
    if (near > 0) return this.merge(state, near);
    const k = state.values.findIndex((value, i) => i < state.k && timestep < value && timestep > state.values[i + 1]);
    if (k >= 0 && y <= WINDOW_BAND_BOTTOM) this.split(state, k, Math.round(timestep));
  }

  split(state, k, timestep) {
    const { values } = state;
    const max = Number(widget(this.node, "segments")?.options?.max ?? 100);
    if (state.k >= max || timestep >= values[k] || timestep <= values[k + 1]) return;
    const rows = state.rows.map((row) => [...row]);
    rows.splice(k + 1, 0, [...rows[k]]); // both halves keep the window's theta
    this.write(state.k + 1, [...values.slice(0, k + 1), timestep, ...values.slice(k + 1)], rows);
  }

  merge(state, i) {
    // boundary i joins windows i-1 and i; the merged window keeps the theta of the earlier (noisier) one
    const rows = state.rows.filter((_, k) => k !== i);
    this.selected = Math.min(this.selected, state.k - 2);
    this.write(state.k - 1, state.values.filter((_, j) => j !== i), rows);
  }

  thetaScale(rows) {
    return Math.max(0.25, ...rows.flat().map(Math.abs));
  }

  // drawing ------------------------------------------------------------------------------------------------
  key() {
    return JSON.stringify(["segments", "boundaries", "theta"].map((name) => widget(this.node, name)?.value).concat(this.previewSteps, this.selected));
  }

  /** Redraw when the widgets changed since the last drawing (or always with force). */
  render(force = false) {
    const key = this.key();
    if (!force && key === this.lastKey) return;
    this.lastKey = key;
    const state = readState(this.node);
    this.state = state;
    this.width = this.measureWidth();
    this.selected = Math.max(0, Math.min(this.selected, state.k - 1));
    const values = state.values ?? uniformBoundaries(state.k);
    const steps = Math.max(this.previewSteps, state.k);
    const grid = timestepGrid(windowTimes(state.values, state.k), steps);
    this.plot.replaceChildren();
    this.plot.setAttribute("viewBox", `0 0 ${this.width} ${PLOT_HEIGHT}`);
    Object.assign(this.plot.dataset, {
      k: String(state.k),
      boundaries: JSON.stringify(values),
      theta: JSON.stringify(state.rows),
      grid: JSON.stringify(grid),
      error: state.error ?? "",
    });
    this.drawWindows(values, state);
    this.drawGrid(grid);
    this.drawAxis();
    this.drawTheta(values, state.rows);
    this.drawBoundaries(values);
    this.updateControls(state, values, steps, grid);
  }

  drawWindows(values, state) {
    for (let k = 0; k < state.k; k++) {
      const x0 = this.x(values[k]);
      const x1 = this.x(values[k + 1]);
      const fill = k === this.selected ? "#4a6a4a" : WINDOW_COLOURS[k % 2];
      const rect = svg("rect", { x: x0, y: 22, width: Math.max(x1 - x0, 0.5), height: 52, fill, "data-window": k }, this.plot);
      svg("title", {}, rect).textContent = `window ${k + 1}: ${+values[k].toFixed(2)} to ${+values[k + 1].toFixed(2)} (double-click to split here)`;
      if (x1 - x0 > 14) {
        const label = svg("text", { x: (x0 + x1) / 2, y: 52, "text-anchor": "middle", fill: "#ccc", "font-size": 11, "pointer-events": "none" }, this.plot);
        label.textContent = String(k + 1);
      }
      const rectBelow = svg("rect", { x: x0, y: 104, width: Math.max(x1 - x0, 0.5), height: 48, fill: "transparent", "data-window": k }, this.plot);
      rectBelow.style.cursor = "pointer";
    }
  }

  drawGrid(grid) {
    for (const timestep of grid) {
      svg("line", { x1: this.x(timestep), x2: this.x(timestep), y1: 76, y2: 86, stroke: "#f0f0f0", "stroke-width": 1.2, "data-step": timestep, "pointer-events": "none" }, this.plot);
    }
  }

  drawAxis() {
    svg("line", { x1: this.x(T), x2: this.x(0), y1: 88, y2: 88, stroke: "#888" }, this.plot);
    for (const timestep of [1000, 750, 500, 250, 0]) {
      svg("line", { x1: this.x(timestep), x2: this.x(timestep), y1: 88, y2: 92, stroke: "#888" }, this.plot);
      const label = svg("text", { x: this.x(timestep), y: 102, "text-anchor": "middle", fill: "#999", "font-size": 10, "pointer-events": "none" }, this.plot);
      label.textContent = String(timestep);
    }
  }

  drawTheta(values, rows) {
    const scale = this.drag?.kind === "theta" ? this.drag.scale : this.thetaScale(rows);
    svg("line", { x1: this.x(T), x2: this.x(0), y1: THETA_ZERO_Y, y2: THETA_ZERO_Y, stroke: "#555", "stroke-dasharray": "3 3", "pointer-events": "none" }, this.plot);
    rows.forEach((row, k) => {
      const x0 = this.x(values[k]);
      const x1 = this.x(values[k + 1]);
      const barWidth = Math.max(Math.min((x1 - x0 - 6) / 3, 14), 1);
      const left = (x0 + x1) / 2 - (3 * barWidth) / 2;
      row.forEach((value, column) => {
        const height = Math.max((Math.min(Math.abs(value), scale) / scale) * THETA_HALF_HEIGHT, 1.5);
        const y = value >= 0 ? THETA_ZERO_Y - height : THETA_ZERO_Y;
        // an invisible, taller hit area around each bar: the one that is dragged
        svg("rect", { x: left + column * barWidth, y: THETA_ZERO_Y - THETA_HALF_HEIGHT - 2, width: barWidth, height: 2 * THETA_HALF_HEIGHT + 4, fill: "transparent", "data-theta-window": k, "data-theta-column": column, cursor: "ns-resize" }, this.plot);
        const bar = svg("rect", { x: left + column * barWidth + 0.5, y, width: Math.max(barWidth - 1, 0.5), height, fill: COLUMN_COLOURS[column], "data-theta-bar": `${k},${column}`, "data-value": value, "pointer-events": "none" }, this.plot);
        svg("title", {}, bar).textContent = `window ${k + 1} theta ${THETA_COLUMNS[column]}: ${value}`;
      });
    });
  }

  drawBoundaries(values) {
    values.forEach((timestep, i) => {
      const x = this.x(timestep);
      const inner = i > 0 && i < values.length - 1;
      svg("line", { x1: x, x2: x, y1: 16, y2: 88, stroke: inner ? "#ffd070" : "#888", "stroke-width": inner ? 2 : 1, "pointer-events": "none" }, this.plot);
      if (!inner) return;
      const grip = svg("rect", { x: x - GRIP_HALF_WIDTH, y: 4, width: 2 * GRIP_HALF_WIDTH, height: 70, fill: "transparent", "data-boundary": i, cursor: "ew-resize" }, this.plot);
      svg("title", {}, grip).textContent = `boundary ${+timestep.toFixed(2)}: drag to move, double-click to merge its windows`;
      svg("rect", { x: x - 4, y: 6, width: 8, height: 10, rx: 2, fill: "#ffd070", "pointer-events": "none" }, this.plot);
      const label = svg("text", { x: x + 6, y: 14, fill: "#ffd070", "font-size": 10, "pointer-events": "none" }, this.plot);
      label.textContent = String(+timestep.toFixed(1));
    });
  }

  updateControls(state, values, steps, grid) {
    const row = state.rows[this.selected];
    this.windowLabel.textContent = `window ${this.selected + 1} theta`;
    this.windowLabel.title = `theta of window ${this.selected + 1} (${+values[this.selected].toFixed(1)} to ${+values[this.selected + 1].toFixed(1)}); click a window to pick it`;
    this.thetaInputs.forEach((input, column) => {
      if (document.activeElement !== input) input.value = String(row[column]);
      input.disabled = Boolean(state.error);
    });
    if (document.activeElement !== this.stepsInput) this.stepsInput.value = String(this.previewSteps);
    const shown = grid.length > 12 ? `${grid.slice(0, 12).join(", ")}, ...` : grid.join(", ");
    const lines = [`K = ${state.k}; ${steps} steps see ${shown}`];
    if (steps > this.previewSteps) lines.push(`fewer steps than segments are raised to ${state.k}`);
    if (hasRepeats(grid)) lines.push(`${steps} steps put two steps on one timestep here: the scheduler refuses it`);
    if (state.warning) lines.push(state.warning);
    if (state.error) lines.push(`cannot draw: ${state.error}`);
    this.message.textContent = lines.join(" \u2022 ");
    this.message.style.color = state.error ? "#f08080" : "#aaa";
  }
}

/** Set a widget's value as if the user had, without running the editor's own reaction to it. */
function setWidgetValue(node, name, value) {
  const target = widget(node, name);
  if (!target || target.value === value) return;
  target.value = value;
  target.callback?.(value, app.canvas, node);
}

/** Let the workflow's change tracker see an edit (undo, the unsaved mark); the editor stops the mouse events it
 * listens to. */
function recordUndoStep() {
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

/** The user typed into segments, boundaries or theta: keep segments and boundaries in agreement and theta's rows
 * at K (rows kept by index, new ones zero; a theta text that cannot be read is left as typed). */
function onTyped(node, name) {
  const editor = node.perflowEditor;
  if (!editor || editor.writing) return;
  const before = editor.state; // what was drawn before this change
  const state = readState(node);
  const keptTheta = (k) => {
    const theta = before ? parseTheta(widget(node, "theta")?.value ?? "", before.k) : { rows: null };
    return theta.rows ? resizeTheta(theta.rows, k) : null;
  };
  if (name === "segments") {
    const k = Number(widget(node, "segments").value);
    editor.write(k, null, keptTheta(k)); // a new K: K equal windows
  } else if (name === "boundaries" && state.values && state.warning) {
    editor.write(state.k, undefined, keptTheta(state.k)); // typed boundaries set K (and stay as typed)
  } else {
    editor.render(true);
  }
}

function addEditor(node) {
  const editor = new SegmentEditor(node);
  node.perflowEditor = editor;
  node.properties ??= {};
  node.properties[PREVIEW_PROPERTY] ??= DEFAULT_PREVIEW_STEPS;
  const domWidget = node.addDOMWidget("perflow_segment_editor", "perflow-segment-editor", editor.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => EDITOR_HEIGHT,
    getMaxHeight: () => EDITOR_HEIGHT,
    getHeight: () => EDITOR_HEIGHT,
  });
  for (const name of ["segments", "boundaries", "theta"]) {
    const target = widget(node, name);
    if (!target) continue;
    const callback = target.callback;
    target.callback = function (...args) {
      const result = callback?.apply(this, args);
      onTyped(node, name);
      return result;
    };
  }
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width, EDITOR_MIN_WIDTH), Math.max(node.size[1], height)]);
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(() => editor.render(true)).observe(editor.plot);
  editor.render(true);
}

/** A frontend whose Vue nodes draw only their built-in widget types (1.27.10) puts the editor nowhere while the node
 * is drawn as a DOM element: then the editor goes into that element after its widgets, in a host of its own, each
 * time Vue draws the node's widgets anew (the node shown, expanded, zoomed back in). Where the frontend places the
 * editor itself (the canvas, Vue nodes with DOM widgets) it is on the page by then and nothing is done. */
function placeAfter(widgets) {
  const id = widgets.closest("[data-node-id]")?.dataset.nodeId;
  const editor = id === undefined ? null : app.canvas?.graph?.getNodeById(id)?.perflowEditor; // the graph on screen
  if (!editor || editor.root.isConnected) return;
  editor.host ??= vueNodeHost();
  editor.host.replaceChildren(editor.root);
  widgets.after(editor.host);
  editor.render(true);
}

function vueNodeHost() {
  const host = html("div", { className: "perflow-editor-host" });
  Object.assign(host.style, { height: `${EDITOR_HEIGHT}px`, minWidth: `${EDITOR_MIN_WIDTH}px`, padding: "0 16px", boxSizing: "border-box" });
  return host;
}

/** The page's DOM changed: look only at what was added (a Vue node's widgets, or a node or graph holding them), and
 * drop a host the frontend took the editor out of. */
function onPageChanged(records) {
  for (const { target, addedNodes } of records) {
    if (target.classList?.contains("perflow-editor-host")) {
      if (!target.firstChild) target.remove(); // the frontend took the editor
      continue;
    }
    if (target.closest?.(".perflow-segment-editor")) continue; // the editor's own redraws
    for (const added of addedNodes) {
      if (!(added instanceof Element)) continue;
      if (added.classList.contains("lg-node-widgets")) placeAfter(added);
      else for (const widgets of added.getElementsByClassName("lg-node-widgets")) placeAfter(widgets);
    }
  }
}

app.registerExtension({
  name: "perflow.SegmentEditor",
  setup() {
    new MutationObserver(onPageChanged).observe(document.body, { childList: true, subtree: true });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      addEditor(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      this.expandToFitContent(); // a workflow saved smaller than the editor
      this.perflowEditor?.render(true);
      return result;
    };
    // Widget values can change without a callback (undo, paste, another extension): redraw when they did.
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (...args) {
      this.perflowEditor?.render();
      return onDrawForeground?.apply(this, args);
    };
  },
});
