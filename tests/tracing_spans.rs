//! The `tracing` spans of `coordkit::connect`'s backends, seen by a subscriber. Alone in its
//! test binary: the subscriber is the process's global default, which no other test shares.

use std::fmt;
use std::sync::Arc;

use coordkit::{Consistency, LockOptions, PutOptions};

/// Records every span's name and the fields recorded on it, as `name field=value`.
#[derive(Clone, Default)]
struct Recorder(Arc<std::sync::Mutex<Vec<String>>>);

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl<S> tracing_subscriber::Layer<S> for Recorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut line = attrs.metadata().name().to_string();
        attrs.record(&mut Fields(&mut line));
        self.0.lock().unwrap().push(line);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut line = span.name().to_string();
        values.record(&mut Fields(&mut line));
        self.0.lock().unwrap().push(line);
    }
}

/// With a subscriber, every call runs in its span and records its outcome. (Without one, a
/// call is the backend's own future; `src/trace.rs` tests that it behaves the same.)
#[tokio::test]
async fn calls_record_their_spans_with_a_subscriber() {
    use tracing_subscriber::layer::SubscriberExt;
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let t = coordkit::connect("memory://").await.unwrap();
    let v = t
        .put("a", b"x".to_vec(), PutOptions::default())
        .await
        .unwrap();
    t.get("a", Consistency::Strong).await.unwrap();
    t.get("/bad", Consistency::Strong).await.unwrap_err();
    let g = t.lock("l", &LockOptions::new()).await.unwrap();
    assert!(t
        .try_lock("l", &LockOptions::new())
        .await
        .unwrap()
        .is_none());
    let token = g.token().get();
    g.release().await.unwrap();
    let lines = recorder.0.lock().unwrap().clone();
    for want in [
        format!("coordkit.put version={}", v.as_raw()),
        "coordkit.get found=true".to_string(),
        "coordkit.get error=\"invalid key\"".to_string(),
        format!("coordkit.lock token={token}"),
        "coordkit.try_lock acquired=false".to_string(),
    ] {
        assert!(lines.contains(&want), "no {want:?} in {lines:#?}");
    }
}
