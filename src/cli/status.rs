//! `flotilla status`: a running flotilla's view of the fleet, as tables, read from its debug API
//! (`/debug/clusters`, and with `--dry-run` each member's plan).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::{ReportFormat, fail, print_stdout};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Where flotilla serves /debug: its HTTPS address (e.g. through `kubectl port-forward`), or
    /// its plain HTTP address when it runs with --http-auth=none.
    #[arg(long, default_value = "https://127.0.0.1:8443", env = "FLOTILLA_URL")]
    pub url: String,
    /// A file holding a bearer token the hub lets `get` /debug (e.g. from `kubectl create token`).
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA that signed flotilla's serving certificate.
    #[arg(long, env = "FLOTILLA_CA_FILE", conflicts_with = "insecure_skip_tls_verify")]
    pub ca_file: Option<PathBuf>,
    /// Do not check flotilla's certificate (its default one is self-signed).
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// `text`: tables; `json`: the debug API's answers (one line per read with --watch).
    #[arg(long, short = 'o', visible_alias = "output", value_enum, default_value = "text", env = "FLOTILLA_FORMAT")]
    pub format: ReportFormat,
    /// Read again every --interval and show it, until interrupted (a terminal is redrawn).
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// How often --watch reads (at least 100ms).
    #[arg(long, default_value = "2s", value_parser = super::parse_duration)]
    pub interval: std::time::Duration,
}

/// Exit 0: answered (whatever the fleet's state); 1: flotilla could not be read.
pub(super) fn status(args: StatusArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return fail(&format!("starting the async runtime: {e}")),
    };
    if !args.watch {
        let (view, plans) = match runtime.block_on(read(&args)) {
            Ok(r) => r,
            Err(e) => return fail(&format!("{}: {e:#}", args.url)),
        };
        return match print_stdout(&shown(&view, &plans, args.format, false)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    // Followed until interrupted or until the reader goes (`| head`); a read that fails is told
    // on stderr and the next one tried (a port-forward that drops should not end the watch).
    use std::io::{IsTerminal, Write};
    let redraw = std::io::stdout().is_terminal() && args.format == ReportFormat::Text;
    let interval = args.interval.max(MIN_INTERVAL);
    loop {
        match runtime.block_on(read(&args)) {
            Ok((view, plans)) => {
                let text = shown(&view, &plans, args.format, true);
                // Home and clear, as `watch` does: the table replaces the previous one.
                let text = if redraw { format!("\x1b[H\x1b[2J{text}") } else { text };
                let mut out = std::io::stdout().lock();
                match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
                    Err(e) => return fail(&format!("stdout: {e}")),
                }
            }
            Err(e) => eprintln!("flotilla: {}: {e:#}", args.url),
        }
        std::thread::sleep(interval);
    }
}

/// The shortest --interval: a faster loop would only load the controller.
const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// One read as shown: tables, or JSON (one line each when watching, so that a pipe gets one
/// document per line).
fn shown(view: &Value, plans: &serde_json::Map<String, Value>, format: ReportFormat, watching: bool) -> String {
    match format {
        ReportFormat::Text if watching => format!("{}\n", to_text(view, plans)),
        ReportFormat::Text => to_text(view, plans),
        ReportFormat::Json => {
            let all = serde_json::json!({ "fleet": view, "plans": plans });
            let text = if watching { serde_json::to_string(&all) } else { serde_json::to_string_pretty(&all) };
            text.expect("serialising JSON") + "\n"
        }
    }
}

/// The fleet view, and with a dry run each member's plan (member → plan).
async fn read(args: &StatusArgs) -> anyhow::Result<(Value, serde_json::Map<String, Value>)> {
    use anyhow::Context;
    let uri: http::Uri = args.url.parse().context("--url")?;
    // A token sent in clear could be read on the way: plain HTTP only to this machine.
    let loopback = matches!(uri.host(), Some("localhost" | "127.0.0.1" | "[::1]" | "::1"));
    if args.token_file.is_some() && uri.scheme_str() != Some("https") && !loopback {
        anyhow::bail!(
            "--token-file with a plain http:// --url that is not this machine: the token would travel in clear"
        );
    }
    let mut config = kube::Config::new(uri);
    config.accept_invalid_certs = args.insecure_skip_tls_verify;
    if let Some(ca) = &args.ca_file {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let ders = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("--ca-file {}: {e}", ca.display()))?;
        config.root_cert = Some(ders.into_iter().map(|d| d.to_vec()).collect());
    }
    crate::controller::deadline::apply(&mut config);
    let token = match &args.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("--token-file {}", path.display()))?;
            Some(text.trim().to_string())
        }
        None => None,
    };
    let client = kube::Client::try_from(config)?;
    let get = |path: String| {
        let (client, token) = (client.clone(), token.clone());
        async move {
            let mut request = http::Request::get(&path);
            if let Some(token) = token {
                request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let text = client.request_text(request.body(Vec::new())?).await.map_err(|e| {
                // The message of a refusal, never the request (it carries the token).
                anyhow::anyhow!("GET {path}: {}", crate::meta::error_chain(&e))
            })?;
            serde_json::from_str::<Value>(&text).with_context(|| format!("GET {path}: not JSON"))
        }
    };
    let view = get("/debug/clusters".into()).await?;
    let mut plans = serde_json::Map::new();
    if view["dryRun"] == true {
        for id in view["clusters"].as_object().into_iter().flat_map(|c| c.keys()) {
            // A member not planned yet (not listed) answers 503: shown without a plan.
            if let Ok(plan) = get(format!("/debug/clusters/{id}/plan")).await {
                plans.insert(id.clone(), plan["plan"].clone());
            }
        }
    }
    Ok((view, plans))
}

/// Columns padded to their widest cell, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn to_text(view: &Value, plans: &serde_json::Map<String, Value>) -> String {
    let flag = |key: &str, yes: &str, no: &str| if view[key] == true { yes.to_string() } else { no.to_string() };
    let mut out = format!(
        "flotilla: {}, {}, {}{}\n\n",
        flag("ready", "ready", "not ready"),
        flag("leader", "leader", "not leading"),
        flag("converged", "converged", "not converged"),
        flag("dryRun", " (dry run: writes nothing)", "")
    );
    let text = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let count = |v: &Value| v.as_array().map_or(0, Vec::len).to_string();
    let mut rows = vec![
        [
            "CLUSTER",
            "STATE",
            "REGION",
            "GATEWAY",
            "DESIRED",
            "CONFLICTS",
            "DISALLOWED",
            "HELD",
            "CONVERGED",
            "LAST ERROR",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let clusters = view["clusters"].as_object().cloned().unwrap_or_default();
    for (id, c) in &clusters {
        let mut state = text(&c["state"]);
        for brake in ["paused", "drained"] {
            if c[brake] == true {
                state = format!("{state},{brake}");
            }
        }
        let held = c["heldPrunes"]
            .as_object()
            .map_or("-".to_string(), |h| format!("{} ({})", text(&h["count"]), text(&h["id"])));
        rows.push(vec![
            id.clone(),
            state,
            text(&c["region"]),
            text(&c["gateway"]),
            text(&c["desiredObjects"]),
            count(&c["conflicts"]),
            text(&c["disallowedClaims"]),
            held,
            if c["converged"] == true { "yes" } else { "no" }.to_string(),
            text(&c["lastError"]),
        ]);
    }
    out.push_str(&table(&rows));
    if !plans.is_empty() {
        out.push('\n');
        let mut rows = vec![
            ["PLAN", "CREATE", "UPDATE", "ADOPT", "PRUNE", "CONFLICTS", "ADMIRAL LEFT"].map(String::from).to_vec(),
        ];
        for (id, plan) in plans {
            let mut row = vec![id.clone()];
            row.extend(
                ["create", "update", "adopt", "prune", "conflicts", "admiralLeftovers"].map(|k| count(&plan[k])),
            );
            rows.push(row);
        }
        out.push_str(&table(&rows));
    }
    if let Some(problems) = view["registrationProblems"].as_array().filter(|p| !p.is_empty()) {
        out.push_str("\nregistration problems:\n");
        for p in problems {
            out.push_str(&format!("  {}\n", text(p)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_fleet_reads_as_tables() {
        let view = json!({
            "ready": true, "leader": false, "dryRun": true, "converged": false, "registrationProblems": [],
            "clusters": {
                "east": {"state": "synced", "region": "us-east-2", "gateway": "10.0.0.2:15443", "desiredObjects": 3,
                    "conflicts": [], "disallowedClaims": 2, "paused": true, "converged": false, "lastError": null},
                "west-long-name": {"state": "stale", "region": null, "gateway": null, "desiredObjects": 0,
                    "conflicts": ["ServiceEntry admiral-sync/a-se"], "disallowedClaims": 0, "converged": false, "lastError": "does not answer",
                    "heldPrunes": {"id": "west-long-name-1", "count": 120, "allowed": 100, "first": []}},
            },
        });
        let plans = json!({"east": {"create": ["a"], "update": [], "adopt": ["b", "c"], "prune": [], "conflicts": [], "admiralLeftovers": ["d"]}});
        let text = to_text(&view, plans.as_object().unwrap());
        assert_eq!(
            text,
            "flotilla: ready, not leading, not converged (dry run: writes nothing)\n\n\
             CLUSTER         STATE          REGION     GATEWAY         DESIRED  CONFLICTS  DISALLOWED  HELD                    CONVERGED  LAST ERROR\n\
             east            synced,paused  us-east-2  10.0.0.2:15443  3        0          2           -                       no         -\n\
             west-long-name  stale          -          -               0        1          0           120 (west-long-name-1)  no         does not answer\n\
             \n\
             PLAN  CREATE  UPDATE  ADOPT  PRUNE  CONFLICTS  ADMIRAL LEFT\n\
             east  1       0       2      0      0          1\n"
        );
    }
}
