//! The sample restaurant loads into a fresh database with consistent, deterministic data,
//! restores the foreign keys that the generator drops, and rolls back completely on failure.

mod support;

use bite_sync::sample::{self, SampleSize};
use tokio_postgres::Client;

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

async fn load(client: &Client, size: SampleSize) {
    if let Err(e) = sample::load(client, size).await {
        panic!("loading the sample failed: {e:?}");
    }
}

#[tokio::test]
async fn demo_size_loads_consistent_data() {
    let dbs = support::test_dbs("demo_size_loads_consistent_data").await;
    let client = support::connect(&dbs.source_url).await;
    let size = SampleSize::DEMO;
    load(&client, size).await;

    let customers = count(&client, "SELECT count(*) FROM customers").await;
    let orders = count(&client, "SELECT count(*) FROM orders").await;
    let items = count(&client, "SELECT count(*) FROM order_items").await;
    assert_eq!(customers, size.customers as i64);
    assert_eq!(orders, size.orders as i64);
    assert_eq!(
        items,
        (size.orders * u64::from(size.items_per_order)) as i64
    );
    assert!(count(&client, "SELECT count(*) FROM menu_items").await > 0);

    let checks = [
        (
            "duplicate phones",
            "SELECT count(*) - count(DISTINCT phone) FROM customers",
        ),
        (
            "badly formatted phones",
            r"SELECT count(*) FROM customers WHERE phone !~ '^\+34 6\d\d \d\d\d \d\d\d$'",
        ),
        (
            "orders without their customer",
            "SELECT count(*) FROM orders o
             WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id)",
        ),
        (
            "items without their order",
            "SELECT count(*) FROM order_items i
             WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = i.order_id)",
        ),
        (
            "items without their menu item",
            "SELECT count(*) FROM order_items i
             WHERE NOT EXISTS (SELECT 1 FROM menu_items m WHERE m.id = i.menu_item_id)",
        ),
        (
            "unused order statuses",
            "SELECT count(*) FROM unnest(enum_range(NULL::order_status)) AS s
             WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.status = s)",
        ),
        (
            "orders whose total is not the sum of their items",
            "SELECT count(*) FROM orders o
             WHERE o.total <> (SELECT coalesce(sum(quantity * unit_price), 0)
                               FROM order_items i WHERE i.order_id = o.id)",
        ),
        (
            "items not at their menu price",
            "SELECT count(*) FROM order_items i JOIN menu_items m ON m.id = i.menu_item_id
             WHERE i.unit_price <> m.price",
        ),
        (
            "timestamps outside the last year",
            "SELECT count(*) FROM orders
             WHERE created_at > now() OR created_at < now() - interval '366 days'",
        ),
    ];
    for (what, sql) in checks {
        assert_eq!(count(&client, sql).await, 0, "{what}");
    }

    // The awkward values the sync must carry over intact are really there.
    let present = [
        (
            "NULL emails",
            "SELECT count(*) FROM customers WHERE email IS NULL",
        ),
        (
            "NULL notes",
            "SELECT count(*) FROM orders WHERE notes IS NULL",
        ),
        (
            "empty notes",
            "SELECT count(*) FROM orders WHERE notes = ''",
        ),
        (
            "notes with a newline",
            "SELECT count(*) FROM orders WHERE notes LIKE E'%\\n%'",
        ),
        (
            "notes with a tab",
            "SELECT count(*) FROM orders WHERE notes LIKE E'%\\t%'",
        ),
        (
            "notes with a backslash",
            r"SELECT count(*) FROM orders WHERE strpos(notes, '\') > 0",
        ),
        (
            "accented names",
            "SELECT count(*) FROM customers WHERE name ~ '[áéíóúñÁÍ]'",
        ),
        (
            "allergies in preferences",
            "SELECT count(*) FROM customers WHERE preferences->'allergies' ? 'gluten'",
        ),
        (
            "tags that need quoting",
            "SELECT count(*) FROM menu_items WHERE array_to_string(tags, '|') LIKE '%, %'",
        ),
    ];
    for (what, sql) in present {
        assert!(count(&client, sql).await > 0, "no {what}");
    }

    // The generator inserts explicit ids, so the sequences must have been moved past them.
    let next_id = count(
        &client,
        "INSERT INTO customers (phone, name) VALUES ('+34 600 000 000', 'Nueva Clienta')
         RETURNING id",
    )
    .await;
    assert_eq!(next_id, customers + 1);
}

/// A digest of every generated value except timestamps (which follow the current day).
const DIGEST_SQL: &str = "
    SELECT md5(
        (SELECT string_agg(concat_ws('|', id, phone, name, email, preferences), E'\\n' ORDER BY id)
         FROM customers)
     || (SELECT string_agg(concat_ws('|', id, name, category, price, available, tags), E'\\n' ORDER BY id)
         FROM menu_items)
     || (SELECT string_agg(concat_ws('|', id, customer_id, status, total, notes,
                                     updated_at - created_at), E'\\n' ORDER BY id)
         FROM orders)
     || (SELECT string_agg(concat_ws('|', order_id, line_no, menu_item_id, quantity, unit_price),
                           E'\\n' ORDER BY order_id, line_no)
         FROM order_items))";

#[tokio::test]
async fn same_size_gives_the_same_rows() {
    let dbs = support::test_dbs("same_size_gives_the_same_rows").await;
    let size = SampleSize {
        customers: 200,
        orders: 700,
        items_per_order: 2,
    };
    let (source, mirror) = tokio::join!(
        support::connect(&dbs.source_url),
        support::connect(&dbs.mirror_url)
    );
    tokio::join!(load(&source, size), load(&mirror, size));
    let digest = |client: Client| async move {
        let row = client.query_one(DIGEST_SQL, &[]).await.expect("digest");
        row.get::<_, String>(0)
    };
    assert_eq!(digest(source).await, digest(mirror).await);
}

const CONSTRAINTS_SQL: &str = "
    SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
    FROM pg_constraint
    WHERE connamespace = 'public'::regnamespace
    ORDER BY 1, 2";

#[tokio::test]
async fn generator_restores_the_schema_constraints_exactly() {
    let dbs = support::test_dbs("generator_restores_constraints").await;
    let schema_only = support::connect(&dbs.mirror_url).await;
    schema_only
        .batch_execute(sample::SCHEMA_SQL)
        .await
        .expect("load the schema alone");
    let loaded = support::connect(&dbs.source_url).await;
    load(
        &loaded,
        SampleSize {
            customers: 10,
            orders: 20,
            items_per_order: 1,
        },
    )
    .await;

    let constraints = |client: Client| async move {
        let rows = client
            .query(CONSTRAINTS_SQL, &[])
            .await
            .expect("constraints");
        rows.iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect::<Vec<(String, String, String)>>()
    };
    let declared = constraints(schema_only).await;
    assert!(
        declared
            .iter()
            .filter(|c| c.2.starts_with("FOREIGN KEY"))
            .count()
            == 3,
        "expected 3 foreign keys in schema.sql: {declared:?}"
    );
    assert_eq!(constraints(loaded).await, declared);
}

#[tokio::test]
async fn failed_load_leaves_the_database_as_it_was() {
    let dbs = support::test_dbs("failed_load_leaves_the_database").await;
    let client = support::connect(&dbs.source_url).await;
    client
        .batch_execute("CREATE TABLE orders (placeholder int)")
        .await
        .expect("create a clashing table");

    let err = sample::load(&client, SampleSize::DEMO)
        .await
        .expect_err("a clashing table must fail the load");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::DUPLICATE_TABLE),
        "{err:?}"
    );

    // The session is usable (not stuck in an aborted transaction) and nothing stayed.
    let left = count(
        &client,
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relname <> 'orders'",
    )
    .await;
    assert_eq!(left, 0);
    let enum_left = count(
        &client,
        "SELECT count(*) FROM pg_type WHERE typname = 'order_status'",
    )
    .await;
    assert_eq!(enum_left, 0);
}
