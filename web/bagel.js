// Shows what a BAGEL node produced on the node itself: the text of Understand / Think / Reason in a
// read-only text box, and a one-line summary of the context every BAGEL node returns (segments, tokens,
// memory). Both come from the node's `ui` payload (`text`, `context`). Neither is saved in the workflow
// nor sent with a prompt, so saved workflows hold exactly the nodes' own widgets.
// Only the frontend's public API: `app` and node.addDOMWidget with a text box of our own (the 1.5x frontend
// marks scripts/widgets.js internal and widget.inputEl deprecated; `widget.element` is the element).
//
// While these nodes decode, the server sends the text so far as ComfyUI's progress text. The frontend
// (1.27 and 1.5x alike) shows progress text in the node's widget named "$$node-text-preview", adding one
// of its own unless the node has it, and sets its `value`. So our text box carries that name: the live
// text and the final `ui` text show in the one box, never twice, and the box stays after the run. The
// box is added when the node is created, before any progress text can come.
import { app } from "../../scripts/app.js";

const TEXT = "$$node-text-preview";
const CONTEXT = "bagel_context";

function displayOnly(widget) {
  widget.serialize = false; // not in the workflow's positional widgets_values
  widget.options.serialize = false; // not an input of the prompt
  return widget;
}

function showsLiveText(node) {
  // The nodes that send progress text are those that take their own id (sockets.node_id_input).
  return !!node.constructor.nodeData?.input?.hidden?.unique_id;
}

function addTextBox(node) {
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.className = "comfy-multiline-input";
  box.style.width = "100%";
  box.placeholder = "text shows here as it is written";
  const widget = node.addDOMWidget(TEXT, "customtext", box, {
    getValue: () => box.value,
    setValue: (value) => {
      // A reader at the end keeps seeing the newest text; one who scrolled up stays where they are.
      const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
      box.value = value;
      if (atEnd) box.scrollTop = box.scrollHeight;
    },
    serialize: false,
  });
  return displayOnly(widget);
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
    if (showsLiveText(node)) addTextBox(node);
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const box = this.widgets?.find((w) => w.name === TEXT);
      if (output?.text && box) box.value = output.text.join("\n\n");
      if (output?.context) showContext(this, output.context.join(" "));
      const [width, height] = this.computeSize();
      this.setSize([Math.max(width, this.size[0]), Math.max(height, this.size[1])]);
      this.setDirtyCanvas(true, true);
    };
  },
});
