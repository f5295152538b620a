//! The sample restaurant: schema (`sql/sample/schema.sql`) and a deterministic data generator
//! (`sql/sample/generate.sql`) used by `bite-sync demo`, the tests and the benchmark.
//!
//! Invariants:
//! - [`load`] is all or nothing: schema and data go in one transaction, so a failed load
//!   leaves the database as it was.
//! - Only numbers are substituted into the generator ([`generate_sql`]), never text, so the
//!   SQL cannot be changed by a size.
//! - The same [`SampleSize`] gives the same rows on every load (timestamps aside, which are
//!   relative to the current day), so benchmark runs compare like with like.

/// The sample restaurant's schema: an enum, customers, menu items, orders and order items.
pub const SCHEMA_SQL: &str = include_str!("../sql/sample/schema.sql");

/// The generator with `{customers}`, `{orders}` and `{items_per_order}` placeholders.
const GENERATE_SQL: &str = include_str!("../sql/sample/generate.sql");

/// How much sample data to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSize {
    /// Rows in `customers`.
    pub customers: u64,
    /// Rows in `orders`; needs at least one customer when non-zero.
    pub orders: u64,
    /// Rows in `order_items` per order.
    pub items_per_order: u32,
}

impl SampleSize {
    /// Small enough to load in a moment: for `bite-sync demo` and the tests.
    pub const DEMO: SampleSize = SampleSize {
        customers: 1_000,
        orders: 5_000,
        items_per_order: 3,
    };

    /// About 400 MB: for `bite-sync bench`.
    pub const BENCH: SampleSize = SampleSize {
        customers: 100_000,
        orders: 1_000_000,
        items_per_order: 3,
    };
}

/// One restaurant transaction, as the demo's live workload and the benchmarks run it: an
/// order with two items for a random customer, another order's status moved on, and a
/// customer's preferences updated (five row changes).
pub const ORDER_TRANSACTION: &str = "
BEGIN;
WITH c AS (SELECT id FROM public.customers WHERE id >= 1 + (random() * (SELECT max(id) - 1 FROM public.customers))::bigint ORDER BY id LIMIT 1),
     o AS (INSERT INTO public.orders (customer_id, total) SELECT id, 21.00 FROM c RETURNING id)
INSERT INTO public.order_items (order_id, line_no, menu_item_id, quantity, unit_price)
SELECT o.id, l, l, 1, 10.50 FROM o, generate_series(1, 2) l;
UPDATE public.orders SET status = 'confirmed', updated_at = now()
 WHERE id = (SELECT id FROM public.orders WHERE status = 'pending' ORDER BY id DESC LIMIT 1 OFFSET 1);
UPDATE public.customers SET preferences = preferences || jsonb_build_object('last_order', now())
 WHERE id = 1 + (random() * (SELECT max(id) - 1 FROM public.customers))::bigint;
COMMIT;";

/// Creates the schema and generates the data in one transaction.
pub async fn load(
    client: &tokio_postgres::Client,
    size: SampleSize,
) -> Result<(), tokio_postgres::Error> {
    // Explicit BEGIN/COMMIT rather than `Client::transaction`, which needs `&mut Client`.
    client.batch_execute("BEGIN").await?;
    let result = async {
        client.batch_execute(SCHEMA_SQL).await?;
        client.batch_execute(&generate_sql(size)).await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() {
        // Leave the session usable; if the connection itself is gone this fails too, and
        // the original error is the one worth reporting.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// The generator SQL with the numbers filled in (pure, unit-tested).
pub fn generate_sql(size: SampleSize) -> String {
    GENERATE_SQL
        .replace("{customers}", &size.customers.to_string())
        .replace("{orders}", &size.orders.to_string())
        .replace("{items_per_order}", &size.items_per_order.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled_with_its_number() {
        let sql = generate_sql(SampleSize {
            customers: 123_457,
            orders: 9_876_543,
            items_per_order: 7,
        });
        for placeholder in ["{customers}", "{orders}", "{items_per_order}"] {
            assert!(!sql.contains(placeholder), "{placeholder} left in the SQL");
        }
        assert!(sql.contains("generate_series(1::bigint, 123457::bigint)"));
        assert!(sql.contains("generate_series(1::bigint, 9876543::bigint)"));
        assert!(sql.contains("generate_series(1, 7)"));
    }

    #[test]
    fn template_uses_every_placeholder() {
        for placeholder in ["{customers}", "{orders}", "{items_per_order}"] {
            assert!(GENERATE_SQL.contains(placeholder), "{placeholder} unused");
        }
    }

    #[test]
    fn generator_never_draws_random_numbers() {
        // random() would make two loads of one size differ, and benchmark runs incomparable.
        assert!(!GENERATE_SQL.to_lowercase().contains("random("));
    }
}
