-- The sample restaurant's schema, loaded into a fresh database by src/sample.rs before
-- generate.sql. Not idempotent on purpose: it only ever meets an empty database.
--
-- It exercises what bite-sync must copy faithfully: an enum, jsonb, text[], numeric with a
-- check, bigserial/serial sequences, a composite primary key, foreign keys (one cascading)
-- and secondary indexes.

CREATE TYPE public.order_status AS ENUM (
    'pending', 'confirmed', 'preparing', 'ready', 'delivered', 'cancelled'
);

CREATE TABLE public.customers (
    id          bigserial PRIMARY KEY,
    phone       text NOT NULL UNIQUE,
    name        text NOT NULL,
    email       text,
    preferences jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.menu_items (
    id        serial PRIMARY KEY,
    name      text NOT NULL UNIQUE,
    category  text NOT NULL,
    price     numeric(10,2) NOT NULL CHECK (price >= 0),
    available boolean NOT NULL DEFAULT true,
    tags      text[] NOT NULL DEFAULT '{}'
);

CREATE TABLE public.orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES public.customers (id),
    status      public.order_status NOT NULL DEFAULT 'pending',
    total       numeric(12,2) NOT NULL DEFAULT 0,
    notes       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz
);

CREATE INDEX orders_customer_id_idx ON public.orders (customer_id);
CREATE INDEX orders_created_at_idx ON public.orders (created_at);

CREATE TABLE public.order_items (
    order_id     bigint NOT NULL REFERENCES public.orders (id) ON DELETE CASCADE,
    line_no      int NOT NULL,
    menu_item_id int NOT NULL REFERENCES public.menu_items (id),
    quantity     int NOT NULL CHECK (quantity > 0),
    unit_price   numeric(10,2) NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
