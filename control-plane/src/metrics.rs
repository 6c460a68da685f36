//! The control plane's Prometheus endpoint (`rally-control serve --metrics ADDR:PORT`).

use std::time::Duration;

use rally_proto::http::{head_complete, metrics_response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves `GET /metrics` on `listener`, each answer rendered by `render()`.
pub async fn serve(
    listener: TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let answer = async {
                let mut head = Vec::with_capacity(512);
                let mut chunk = [0u8; 512];
                while !head_complete(&head) {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&chunk[..n]);
                }
                stream
                    .write_all(&metrics_response(&head, || Some(render())))
                    .await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), answer).await;
        });
    }
}
