// Shows on a PeRFlow node the text it reports when it runs (ui.text): the timesteps the network sees, the
// settings with `auto` resolved, the settings read from a checkpoint. Read-only, copyable (theta rows paste into
// PeRFlow Settings), not saved with the workflow.
const { app } = window.comfyAPI.app;

const WIDGET_NAME = "perflow_text";
const LINE_HEIGHT_PX = 15;
const MAX_LINES = 8; // longer text scrolls inside the box: the node grows by at most this much

function textWidget(node) {
  const existing = node.widgets?.find((widget) => widget.name === WIDGET_NAME);
  if (existing) return existing;
  const area = document.createElement("textarea");
  area.className = "comfy-multiline-input perflow-node-text";
  area.readOnly = true;
  area.spellcheck = false;
  area.style.whiteSpace = "pre";
  area.style.fontFamily = "monospace";
  for (const event of ["pointerdown", "pointermove", "wheel"]) {
    area.addEventListener(event, (e) => e.stopPropagation());
  }
  return node.addDOMWidget(WIDGET_NAME, "perflow_text", area, {
    serialize: false,
    getValue: () => area.value,
    setValue: (value) => {
      area.value = value;
    },
    getMinHeight: () => LINE_HEIGHT_PX * (Math.min(area.value.split("\n").length, MAX_LINES) + 1),
  });
}

function showText(node, text) {
  textWidget(node).value = text;
  const [width, height] = node.computeSize();
  node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "PeRFlow.NodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.category ?? "").startsWith("PeRFlow")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      if (Array.isArray(output?.text) && output.text.length) showText(this, output.text.join("\n"));
    };
  },
});
