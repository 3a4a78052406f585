//! `overlay service ...`, as the seeds show Docker's experimental services: a service is a name
//! published on one network (`NAME.NETWORK`), resolving there to the containers attached to it.
//! The rules (what is refused, and why) are in store/service.rs.

use clap::Subcommand;
use serde::Serialize;

use super::{Outcome, inspect, output::say, print_table};
use crate::store::{Store, service::parse_service_ref};

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Publish a service on a network.
    Publish {
        /// SERVICE.NETWORK
        #[arg(value_name = "SERVICE.NETWORK")]
        service: String,
    },
    /// Remove a published service; refused while containers are attached to it.
    Unpublish {
        #[arg(value_name = "SERVICE.NETWORK")]
        service: String,
    },
    /// Attach a container (connected to the service's network) to a service as a backend.
    Attach {
        container: String,
        #[arg(value_name = "SERVICE.NETWORK")]
        service: String,
    },
    /// Detach a container from a service.
    Detach {
        container: String,
        #[arg(value_name = "SERVICE.NETWORK")]
        service: String,
    },
    /// List services with their backends.
    #[command(visible_alias = "list")]
    Ls,
    /// Display detailed information on one or more services.
    #[command(visible_alias = "info")]
    Inspect {
        #[arg(required = true, value_name = "SERVICE.NETWORK")]
        services: Vec<String>,
    },
}

/// `service inspect`'s JSON for one service.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceInspect {
    name: String,
    network: String,
    #[serde(rename = "NetworkID")]
    network_id: String,
    created: String,
    /// The attached containers, with their address on the network.
    backends: Vec<Backend>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Backend {
    container: String,
    host: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    #[serde(rename = "IPAddress")]
    ip_address: String,
}

pub async fn run(store: &Store, cmd: ServiceCommand) -> anyhow::Result<Outcome> {
    match cmd {
        ServiceCommand::Publish { service } => {
            let (name, network) = parse_service_ref(&service)?;
            store.publish_service(&network, &name).await?;
            say(&service)?;
        }
        ServiceCommand::Unpublish { service } => {
            let (name, network) = parse_service_ref(&service)?;
            store.unpublish_service(&network, &name).await?;
            say(&service)?;
        }
        ServiceCommand::Attach { container, service } => {
            store.service_backend(&container, &service, true).await?;
        }
        ServiceCommand::Detach { container, service } => {
            store.service_backend(&container, &service, false).await?;
        }
        ServiceCommand::Ls => {
            let rows = store.services().await?.into_iter().map(|s| {
                let backends: Vec<String> =
                    s.backends.iter().map(|e| format!("{}={}", e.container, e.ipv4)).collect();
                vec![s.service.name, s.network, backends.join(",")]
            });
            print_table(&["SERVICE", "NETWORK", "BACKENDS"], rows)?;
        }
        ServiceCommand::Inspect { services } => {
            let all = store.services().await?;
            let mut out = Vec::new();
            let mut failed = false;
            for query in &services {
                let (name, network) = parse_service_ref(query)?;
                let found = all.iter().find(|s| {
                    s.service.name == name
                        && (s.network == network || s.service.network_id.starts_with(&network))
                });
                if let Some(s) = found {
                    out.push(ServiceInspect {
                        name: s.service.name.clone(),
                        network: s.network.clone(),
                        network_id: s.service.network_id.clone(),
                        created: s.service.created.clone(),
                        backends: s
                            .backends
                            .iter()
                            .map(|e| Backend {
                                container: e.container.clone(),
                                host: e.host.clone(),
                                endpoint_id: e.id.clone(),
                                ip_address: e.ipv4.to_string(),
                            })
                            .collect(),
                    });
                } else {
                    eprintln!("Error: service {name:?} is not published on network {network:?}");
                    failed = true;
                }
            }
            say(inspect::to_json(&out))?;
            return Ok(if failed { Outcome::Failed } else { Outcome::Done });
        }
    }
    Ok(Outcome::Done)
}
