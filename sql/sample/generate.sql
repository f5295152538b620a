-- The sample restaurant's data, run by src/sample.rs right after schema.sql in the same
-- transaction. {customers}, {orders} and {items_per_order} are replaced by plain numbers
-- before this runs ({orders} > 0 needs {customers} > 0).
--
-- Set-based INSERT ... SELECT over generate_series, so the benchmark's 1M orders take
-- seconds rather than the minutes that row-by-row inserts would.
--
-- Deterministic: every value derives from the row number g with integer arithmetic, never
-- from a random number generator, so two loads of one size hold the same rows. The one
-- exception is the time anchor: timestamps count back from the start of the current day,
-- so the data always covers "the last year".

INSERT INTO public.menu_items (name, category, price, available, tags) VALUES
    ('Patatas bravas',           'tapas',       5.50, true,  '{vegetariano,picante}'),
    ('Croquetas de jamón',       'tapas',       7.00, true,  '{}'),
    ('Pimientos de Padrón',      'tapas',       6.00, true,  '{vegano,sin_gluten}'),
    ('Tortilla española',        'tapas',       6.50, true,  '{vegetariano,sin_gluten}'),
    ('Gambas al ajillo',         'tapas',      11.50, true,  '{marisco,sin_gluten}'),
    ('Pulpo a la gallega',       'tapas',      16.00, true,  '{sin_gluten}'),
    ('Jamón ibérico de bellota', 'tapas',      22.00, true,  '{sin_gluten,sin_lactosa}'),
    ('Calamares a la romana',    'tapas',       9.50, true,  '{marisco}'),
    ('Boquerones en vinagre',    'tapas',       6.50, true,  '{pescado,sin_gluten}'),
    ('Pan con tomate',           'tapas',       3.50, true,  '{vegano}'),
    ('Gazpacho andaluz',         'entrantes',   6.00, true,  '{vegano,sin_gluten,frío}'),
    ('Salmorejo cordobés',       'entrantes',   6.50, true,  '{vegetariano,frío}'),
    ('Ensalada mixta',           'entrantes',   8.00, true,  '{vegetariano,sin_gluten}'),
    ('Pisto manchego',           'entrantes',   9.00, true,  '{vegano,sin_gluten}'),
    ('Paella valenciana',        'arroces',    16.50, true,  '{sin_gluten,"para compartir, 2 personas"}'),
    ('Paella de marisco',        'arroces',    18.50, true,  '{marisco,sin_gluten,"para compartir, 2 personas"}'),
    ('Arroz negro',              'arroces',    17.00, true,  '{marisco,sin_gluten}'),
    ('Fideuà',                   'arroces',    16.00, false, '{marisco}'),
    ('Cochinillo asado',         'principales', 24.00, true, '{sin_gluten}'),
    ('Rabo de toro',             'principales', 19.50, true, '{}'),
    ('Merluza a la vasca',       'principales', 18.00, true, '{pescado}'),
    ('Bacalao al pil-pil',       'principales', 19.00, true, '{pescado,sin_gluten}'),
    ('Secreto ibérico',          'principales', 17.50, true, '{sin_gluten,sin_lactosa}'),
    ('Fabada asturiana',         'principales', 14.00, true, '{}'),
    ('Crema catalana',           'postres',     5.50, true,  '{vegetariano}'),
    ('Churros con chocolate',    'postres',     5.00, true,  '{vegetariano}'),
    ('Tarta de Santiago',        'postres',     6.00, true,  '{vegetariano,sin_gluten,frutos_secos}'),
    ('Flan de huevo',            'postres',     4.50, true,  '{vegetariano,sin_gluten}'),
    ('Sangría (jarra)',          'bebidas',    14.00, true,  '{alcohol,"para compartir, 4 personas"}'),
    ('Agua mineral',             'bebidas',     2.00, true,  '{vegano,sin_gluten}'),
    ('Caña de cerveza',          'bebidas',     2.50, true,  '{alcohol}'),
    ('Café con leche',           'bebidas',     1.80, true,  '{vegetariano}');

-- Foreign keys are checked by a trigger per row, which would triple the load time. The rows
-- below are built to satisfy them, so the keys come off here and go back on at the end,
-- where PostgreSQL validates each one with a single join. The re-added definitions must
-- match schema.sql (a test compares them).
ALTER TABLE public.order_items
    DROP CONSTRAINT order_items_order_id_fkey,
    DROP CONSTRAINT order_items_menu_item_id_fkey;
ALTER TABLE public.orders DROP CONSTRAINT orders_customer_id_fkey;

-- Phones are '+34 6' and 8 digits from (g * 7919 + 1234567) mod 10^8: 7919 is coprime to
-- 10^8, so distinct g up to 10^8 give distinct phones.
INSERT INTO public.customers (id, phone, name, email, preferences, created_at)
SELECT g,
       '+34 6' || substr(d, 1, 2) || ' ' || substr(d, 3, 3) || ' ' || substr(d, 6, 3),
       first_name || ' ' || surname1 || ' ' || surname2,
       CASE WHEN g % 7 = 0 THEN NULL
            ELSE translate(lower(first_name || '.' || surname1),
                           'áéíóúüñçÁÉÍÓÚÑ', 'aeiouuncaeioun')
                 || g || '@'
                 || (ARRAY['gmail.com', 'hotmail.es', 'yahoo.es', 'outlook.com',
                           'telefonica.net'])[1 + g % 5]
       END,
       jsonb_build_object(
           'lang', (ARRAY['es', 'es', 'es', 'es', 'es', 'es', 'ca', 'en', 'eu', 'gl'])[1 + g % 10],
           'allergies', CASE g % 9
                            WHEN 0 THEN '["gluten"]'::jsonb
                            WHEN 1 THEN '["lactosa"]'::jsonb
                            WHEN 2 THEN '["frutos_secos", "marisco"]'::jsonb
                            ELSE '[]'::jsonb
                        END,
           'newsletter', g % 3 = 0
       ) || CASE WHEN g % 11 = 0
                 THEN jsonb_build_object('mesa_favorita', 1 + g % 20,
                                         'nota', 'Prefiere terraza — sin corrientes')
                 ELSE '{}'::jsonb
            END,
       date_trunc('day', now())
           - make_interval(secs => 31536000.0 * ({customers} - g) / {customers} + (g * 7919) % 3600)
FROM (
    SELECT g,
           lpad(((g * 7919 + 1234567) % 100000000)::text, 8, '0') AS d,
           (ARRAY['María', 'José', 'Antonio', 'Carmen', 'Manuel', 'Ana', 'Francisco', 'Laura',
                  'David', 'Lucía', 'Javier', 'Marta', 'Daniel', 'Elena', 'Carlos', 'Paula',
                  'Jesús', 'Sara', 'Alejandro', 'Cristina', 'Miguel', 'Isabel', 'Rafael',
                  'Pilar', 'Pablo', 'Raquel', 'Sergio', 'Nuria', 'Fernando', 'Rocío', 'Jorge',
                  'Beatriz', 'Álvaro', 'Sofía', 'Íñigo', 'Begoña', 'Joan', 'Montserrat',
                  'Xabier', 'Ainhoa'])[1 + (g * 17) % 40] AS first_name,
           (ARRAY['García', 'Rodríguez', 'González', 'Fernández', 'López', 'Martínez',
                  'Sánchez', 'Pérez', 'Gómez', 'Martín', 'Jiménez', 'Ruiz', 'Hernández',
                  'Díaz', 'Moreno', 'Muñoz', 'Álvarez', 'Romero', 'Alonso', 'Gutiérrez',
                  'Navarro', 'Torres', 'Domínguez', 'Vázquez', 'Ramos', 'Gil', 'Ramírez',
                  'Serrano', 'Blanco', 'Molina', 'Castro', 'Ortiz', 'Rubio', 'Marín', 'Sanz',
                  'Núñez', 'Iglesias', 'Medina', 'Garrido', 'Peña'])[1 + (g / 40 * 13 + g) % 40]
               AS surname1,
           (ARRAY['García', 'Rodríguez', 'González', 'Fernández', 'López', 'Martínez',
                  'Sánchez', 'Pérez', 'Gómez', 'Martín', 'Jiménez', 'Ruiz', 'Hernández',
                  'Díaz', 'Moreno', 'Muñoz', 'Álvarez', 'Romero', 'Alonso', 'Gutiérrez',
                  'Navarro', 'Torres', 'Domínguez', 'Vázquez', 'Ramos', 'Gil', 'Ramírez',
                  'Serrano', 'Blanco', 'Molina', 'Castro', 'Ortiz', 'Rubio', 'Marín', 'Sanz',
                  'Núñez', 'Iglesias', 'Medina', 'Garrido', 'Peña'])[1 + (g / 1600 * 7 + g * 3) % 40]
               AS surname2
    FROM generate_series(1::bigint, {customers}::bigint) AS g
) AS c;

-- Line l of order g: menu item (g * 7 + l * 11) mod n (in id order), at its menu price.
-- Inserted before the orders, so that each order's total can be summed from its lines.
WITH menu AS (
    SELECT array_agg(id ORDER BY id) AS ids, array_agg(price ORDER BY id) AS prices,
           count(*)::int AS n
    FROM public.menu_items
)
INSERT INTO public.order_items (order_id, line_no, menu_item_id, quantity, unit_price)
SELECT g,
       l,
       menu.ids[1 + (g * 7 + l * 11) % menu.n],
       1 + (g + l) % 3,
       menu.prices[1 + (g * 7 + l * 11) % menu.n]
FROM menu,
     generate_series(1::bigint, {orders}::bigint) AS g,
     generate_series(1, {items_per_order}) AS l;

-- Half the orders spread evenly over all customers; the other half skew towards low ids
-- (the product of two spread-out values), so some customers are regulars. Statuses follow
-- a weighted list of 20 holding every value; 37 is coprime to 20, so any 20 consecutive
-- orders use them all.
INSERT INTO public.orders (id, customer_id, status, total, notes, created_at, updated_at)
SELECT g,
       CASE WHEN g % 2 = 0 THEN 1 + (g / 2 * 2654435761) % {customers}
            ELSE 1 + ((g * 2654435761) % {customers}) * ((g * 40503) % 1000) / 1000
       END,
       status,
       coalesce(t.total, 0),
       CASE g % 50
           WHEN 0 THEN 'Sin cebolla, por favor'
           WHEN 7 THEN E'Alergia al marisco.\nAvisar en cocina'
           WHEN 13 THEN E'Entregar en:\tCalle Mayor 12, 3º B'
           WHEN 21 THEN 'Cumpleaños de Íñigo: poner una vela 🎂'
           WHEN 29 THEN E'Dice "sin picante" \\ muy importante'
           WHEN 36 THEN E'Recogerá a las 21:30\r\nPagará con tarjeta'
           WHEN 42 THEN 'Poco hecho; la salsa aparte'
           WHEN 45 THEN ''
           ELSE NULL
       END,
       created_at,
       CASE WHEN status = 'pending' THEN NULL
            ELSE created_at + make_interval(mins => 5 + (g % 55)::int)
       END
FROM generate_series(1::bigint, {orders}::bigint) AS g
     LEFT JOIN (
         SELECT order_id, sum(quantity * unit_price) AS total
         FROM public.order_items
         GROUP BY order_id
     ) AS t ON t.order_id = g,
     LATERAL (
         SELECT (ARRAY['delivered', 'delivered', 'delivered', 'delivered', 'delivered',
                       'delivered', 'delivered', 'delivered', 'delivered', 'delivered',
                       'delivered', 'delivered', 'cancelled', 'cancelled', 'pending',
                       'confirmed', 'confirmed', 'preparing', 'ready', 'ready']
                )[1 + (g * 37) % 20]::public.order_status AS status,
                date_trunc('day', now())
                    - make_interval(secs => 31536000.0 * ({orders} - g) / {orders} + (g * 7919) % 3600)
                    AS created_at
     ) AS o;

ALTER TABLE public.orders
    ADD CONSTRAINT orders_customer_id_fkey
    FOREIGN KEY (customer_id) REFERENCES public.customers (id);
ALTER TABLE public.order_items
    ADD CONSTRAINT order_items_order_id_fkey
    FOREIGN KEY (order_id) REFERENCES public.orders (id) ON DELETE CASCADE,
    ADD CONSTRAINT order_items_menu_item_id_fkey
    FOREIGN KEY (menu_item_id) REFERENCES public.menu_items (id);

-- The rows above carry explicit ids, so the sequences must catch up for later inserts.
SELECT setval(pg_get_serial_sequence('public.customers', 'id'), coalesce(max(id), 1), max(id) IS NOT NULL)
FROM public.customers;
SELECT setval(pg_get_serial_sequence('public.menu_items', 'id'), coalesce(max(id), 1), max(id) IS NOT NULL)
FROM public.menu_items;
SELECT setval(pg_get_serial_sequence('public.orders', 'id'), coalesce(max(id), 1), max(id) IS NOT NULL)
FROM public.orders;

ANALYZE public.customers, public.menu_items, public.orders, public.order_items;
