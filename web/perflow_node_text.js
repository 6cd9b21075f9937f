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
  node.expandToFitContent();
  node.setDirtyCanvas?.(true, true);
}

const perflowTypes = new Set();
let runningPromptId = null;

function showOwnText(node, output) {
  if (Array.isArray(output?.text) && output.text.length) showText(node, output.text.join("\n"));
}

// A node ComfyUI serves from its cache gets no `executed` message (only output nodes do), but the prompt's history
// holds every node's ui output: read it when the prompt has finished (`executing` with no node comes after the
// history is written).
async function showTextsFromHistory(promptId) {
  const nodes = (app.graph?._nodes ?? []).filter((node) => perflowTypes.has(node.type));
  if (!nodes.length) return;
  const response = await app.api.fetchApi(`/history/${encodeURIComponent(promptId)}`);
  if (!response.ok) return;
  const outputs = (await response.json())[promptId]?.outputs ?? {};
  for (const node of nodes) {
    if (outputs[String(node.id)]) showOwnText(node, outputs[String(node.id)]);
  }
}

app.registerExtension({
  name: "PeRFlow.NodeText",
  setup() {
    app.api.addEventListener("execution_start", ({ detail }) => {
      runningPromptId = detail?.prompt_id ?? null;
    });
    app.api.addEventListener("executing", ({ detail }) => {
      if (detail !== null || !runningPromptId) return;
      const promptId = runningPromptId;
      runningPromptId = null;
      showTextsFromHistory(promptId).catch((error) => console.warn("PeRFlow: no node text from the history", error));
    });
  },
  // The node search matches names, display names and (newer frontends) search_aliases, never descriptions.
  addCustomNodeDefs(defs) {
    for (const def of Object.values(defs)) {
      if (String(def?.category ?? "").startsWith("PeRFlow")) {
        def.search_aliases = [...(def.search_aliases ?? []), "piecewise rectified flow"];
      }
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.category ?? "").startsWith("PeRFlow")) return;
    perflowTypes.add(nodeData.name);
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      showOwnText(this, output);
    };
  },
});
