// Shows what a BAGEL node produced on the node itself: the answer or thought of Understand / Think in a
// read-only text box, and a one-line summary of the context every BAGEL node returns (segments, tokens,
// memory). Both come from the node's `ui` payload (`text`, `context`). Neither is saved in the workflow
// nor sent with a prompt, so saved workflows hold exactly the nodes' own widgets.
// Only the frontend's public API: `app` and node.addDOMWidget with a text box of our own (the 1.5x frontend
// marks scripts/widgets.js internal and widget.inputEl deprecated; `widget.element` is the element).
import { app } from "../../scripts/app.js";

const TEXT = "bagel_text";
const CONTEXT = "bagel_context";

function displayOnly(widget) {
  widget.serialize = false; // not in the workflow's positional widgets_values
  widget.options.serialize = false; // not an input of the prompt
  return widget;
}

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === TEXT);
  if (!widget) {
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.className = "comfy-multiline-input";
    box.style.width = "100%";
    widget = node.addDOMWidget(TEXT, "customtext", box, {
      getValue: () => box.value,
      setValue: (value) => {
        box.value = value;
      },
      serialize: false,
    });
    displayOnly(widget);
  }
  widget.element.value = text;
}

function showContext(node, summary) {
  let widget = node.widgets?.find((w) => w.name === CONTEXT);
  if (!widget) {
    // A disabled widget draws its label and no value: the label is the summary line.
    widget = displayOnly(node.addWidget("text", CONTEXT, "", () => {}, {}));
    widget.disabled = true;
  }
  widget.label = `context: ${summary}`;
}

app.registerExtension({
  name: "comfyui-bagel-mot.outputs",
  nodeCreated(node) {
    if (!node.comfyClass?.startsWith("BAGEL")) return;
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      if (output?.text) showText(this, output.text.join("\n\n"));
      if (output?.context) showContext(this, output.context.join(" "));
      const [width, height] = this.computeSize();
      this.setSize([Math.max(width, this.size[0]), Math.max(height, this.size[1])]);
      this.setDirtyCanvas(true, true);
    };
  },
});
