// bite-sync on Railway: the WhatsApp relay (`bite-sync relay`) and the Postgres it stores its
// inbox in, which is also the mirror `bite-sync run` replicates into from the restaurant.
//
// Railway's Infrastructure as Code (Railway stopped reading railway.toml on 2026-12-01):
//   railway login && railway link
//   railway config plan       # what would change; secrets are shown as «hidden»
//   railway config apply
//   railway up --service bite-relay    # or connect this repository in the dashboard
// The README's "Deploying on Railway" has the steps, including what is set in the dashboard
// (the secrets' values, the restart policy, the draining time, the domain).
//
// tests/deploy.rs type-checks this file against Railway's SDK (pinned in package-lock.json)
// and checks what it declares against the relay's code: a variable the relay reads and this
// file lacks, or one it declares and the relay does not read, fails the tests.

import { defineRailway, postgres, preserve, project, service } from "railway/iac";

export default defineRailway((ctx) => {
  const db = postgres("Postgres");

  const relay = service("bite-relay", {
    // The repository's Dockerfile: a release build in a small distroless image running
    // `bite-sync relay` as a non-root user, listening on Railway's PORT on every interface.
    build: { builder: "DOCKERFILE", dockerfilePath: "Dockerfile" },
    // 200 once the relay serves and its database answers; it never calls the backend or an
    // AI provider, so a slow one cannot make Railway restart the relay.
    healthcheck: "/api/sync/health",
    healthcheckTimeout: 120,
    // Replicas coordinate only through Postgres (dedupe, delivery leases, AI claims, send
    // rate limits), so production runs two: a restart or a deploy never leaves Meta without
    // an answer.
    replicas: ctx.environment === "production" ? 2 : 1,
    env: {
      // Where every webhook is stored before Meta gets its 200.
      DATABASE_URL: db.env.DATABASE_URL,

      // Secrets, and settings that may hold one, are set in the dashboard (service →
      // Variables) and kept there: preserve() never writes a value.
      WHATSAPP_VERIFY_TOKEN: preserve(), // required: the Verify token typed in Meta's dashboard
      META_APP_SECRET: preserve(), // required: App settings → Basic → App secret
      WHATSAPP_ACCESS_TOKEN: preserve(), // to reply: a system-user token
      WHATSAPP_PHONE_NUMBER_ID: preserve(), // to reply: WhatsApp → API Setup
      SYNC_API_KEY: preserve(), // shared with the restaurant: signs every delivery
      JWT_SECRET: preserve(), // the backend's JWTs, accepted on POST /api/messages
      OPENAI_API_KEY: preserve(), // AI replies: the first provider with a key is used
      GEMINI_API_KEY: preserve(),
      ANTHROPIC_API_KEY: preserve(),
      LOCAL_BACKEND_URL: preserve(), // only with DELIVERY_MODE=push
      BITE_ALERT_WEBHOOK: preserve(), // Slack-compatible incoming webhook for alerts
      // During a rotation only (README: "Rotating secrets"): the old value, still accepted.
      META_APP_SECRET_PREVIOUS: preserve(),
      SYNC_API_KEY_PREVIOUS: preserve(),
      JWT_SECRET_PREVIOUS: preserve(),

      // Optional settings with defaults in the relay; set one in the dashboard to change it.
      DELIVERY_MODE: preserve(), // pull (default) or push
      DELIVERY_FORMAT: preserve(), // bite-sync (default) or meta: Meta's webhook, as Meta signs it
      DELIVERY_PATH: preserve(), // the backend's path for deliveries (/ allowed)
      SYNC_ENABLED: preserve(), // false stops delivery to the backend
      GRAPH_API_URL: preserve(),
      GRAPH_API_VERSION: preserve(), // default v25.0
      AI_PROVIDER: preserve(), // openai, gemini or anthropic first
      AI_DEADLINE: preserve(), // default 20s
      OPENAI_MODEL: preserve(),
      OPENAI_BASE_URL: preserve(),
      GEMINI_MODEL: preserve(),
      GEMINI_BASE_URL: preserve(),
      ANTHROPIC_MODEL: preserve(),
      ANTHROPIC_BASE_URL: preserve(),
    },
  });

  return project("bite-sync", { resources: [db, relay] });
});
