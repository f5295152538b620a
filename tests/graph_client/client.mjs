// Backend code written for Meta's WhatsApp Cloud API, using @great-detail/whatsapp as its
// users do, with only the base URL and the token changed: RELAY_URL instead of
// https://graph.facebook.com, and the relay's key (or a JWT) instead of Meta's access token.
// Run by tests/relay_graph.rs; prints one JSON object with what each call returned.
import Client from "@great-detail/whatsapp";

const { RELAY_URL, TOKEN, PHONE_ID, GRAPH_VERSION } = process.env;

function sdk(token) {
  return new Client({
    prefixUrl: RELAY_URL,
    graphVersion: GRAPH_VERSION,
    request: { headers: { Authorization: `Bearer ${token}` }, retry: 0 },
  });
}

// A call's answer, or Meta's error as the library surfaces it (ky's HTTPError).
async function call(promise) {
  try {
    const response = await promise;
    return { status: response.status, body: await response.json() };
  } catch (e) {
    if (e.response) {
      return { status: e.response.status, body: await e.response.json(), thrown: e.name };
    }
    return { failed: String(e) };
  }
}

const wa = sdk(TOKEN);
const out = {};
out.text = await call(
  wa.message.createMessage({
    phoneNumberID: PHONE_ID,
    to: "34612345678",
    type: "text",
    text: { preview_url: false, body: "Tu pedido está listo" },
  }),
);
out.template = await call(
  wa.message.createMessage({
    phoneNumberID: PHONE_ID,
    to: "34699000111",
    type: "template",
    template: {
      name: "order_ready",
      language: { code: "es" },
      components: [{ type: "body", parameters: [{ type: "text", text: "17" }] }],
    },
  }),
);
out.read = await call(
  wa.message.createStatus({
    phoneNumberID: PHONE_ID,
    status: "read",
    message_id: "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=",
  }),
);
const image = new Uint8Array(2 * 1024 * 1024);
for (let i = 0; i < image.length; i++) image[i] = i % 251;
out.media = await call(
  wa.media.upload({
    phoneNumberID: PHONE_ID,
    file: new Blob([image], { type: "image/png" }),
    filename: "menu.png",
    mimeType: "image/png",
  }),
);
out.refused = await call(
  wa.message.createMessage({
    phoneNumberID: PHONE_ID,
    to: "34655555555",
    type: "text",
    text: { body: "outside the window" },
  }),
);
out.wrong_token = await call(
  sdk("EAAG-not-the-relay-key").message.createMessage({
    phoneNumberID: PHONE_ID,
    to: "34612345678",
    type: "text",
    text: { body: "hola" },
  }),
);
out.other_number = await call(
  wa.message.createMessage({
    phoneNumberID: "999999999999",
    to: "34612345678",
    type: "text",
    text: { body: "hola" },
  }),
);
process.stdout.write(JSON.stringify(out) + "\n");
