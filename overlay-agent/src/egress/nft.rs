//! The agent's own nftables table, `ip overlay`: masquerading of what containers send out,
//! published ports, and the forwarding filter that keeps networks apart on the host
//! (docs/egress.md).
//!
//! Written with the `nftables` crate (the one netavark uses): typed rules, serialised to nft's
//! JSON and applied by `nft -j -f -` in one transaction. The whole table is rewritten each time
//! (created, deleted and made again in one batch, so no packet ever sees it half-made or
//! missing): the rules are few (four, plus two per published port), a rewrite is one `nft` run,
//! and a restarted agent simply writes the same table again instead of having to diff a
//! predecessor's. Conntrack keeps the translations of established connections, so a rewrite
//! disturbs none of them.
//!
//! Every rule matches only packets of ours: by the interface group of the containers' veths
//! (`netlink::egress_path::GROUP`), by the overlay subnets as source, or by a published port.
//! No other table or chain is touched; other tables' verdicts still apply (a drop anywhere is
//! final in nftables).

use std::{borrow::Cow, collections::BTreeSet, net::Ipv4Addr};

use ipnet::Ipv4Net;
use nftables::{
    batch::Batch,
    expr::{
        CT, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
        Prefix,
    },
    helper::{NftablesError, apply_ruleset_async, get_current_ruleset_raw_async},
    schema::{Chain, NfListObject, Rule, Table},
    stmt::{Counter, Match, NAT, NATFamily, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use crate::{model::PortMapping, netlink::egress_path::GROUP};

/// The table's name (family `ip`).
pub const TABLE: &str = "overlay";

/// A published port on this host and where it leads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Published {
    pub port: PortMapping,
    /// The container's address on the network it is published on.
    pub target: Ipv4Addr,
    /// For the rule's comment: `nft list table ip overlay` says whose port it is.
    pub container: String,
}

/// What the table holds: the subnets masqueraded on the way out, and the published ports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub subnets: BTreeSet<Ipv4Net>,
    pub published: BTreeSet<Published>,
    /// The host's own address, the source of a container's connection to a port published on
    /// this host (hairpin): without it, the container behind the port would answer the caller's
    /// overlay address straight over the overlay, past the translation, and the caller would
    /// drop a reply from an address it never called. None: no hairpin rule.
    pub host: Option<Ipv4Addr>,
}

impl Ruleset {
    /// Whether there is nothing to hold: the table is then removed, so a host without
    /// containers with a way out keeps nothing of ours.
    pub fn is_empty(&self) -> bool {
        self.subnets.is_empty() && self.published.is_empty()
    }

    /// `ip saddr { <subnets> }`: the packet is a container's (for postrouting, which knows no
    /// input device).
    fn containers_source(&self) -> Statement<'static> {
        matches(payload("ip", "saddr"), self.subnet_set(), Operator::EQ)
    }

    /// `ip daddr != { <subnets> }`: the packet is not for an address of the overlay.
    fn containers_dest(&self) -> Statement<'static> {
        matches(payload("ip", "daddr"), self.subnet_set(), Operator::NEQ)
    }

    fn subnet_set(&self) -> Expression<'static> {
        let set = self
            .subnets
            .iter()
            .map(|n| {
                nftables::expr::SetItem::Element(Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(Expression::String(n.network().to_string().into())),
                    len: u32::from(n.prefix_len()),
                })))
            })
            .collect();
        Expression::Named(NamedExpression::Set(set))
    }

    /// The batch that replaces the table with this ruleset (or removes it, when empty).
    pub fn batch(&self) -> Batch<'static> {
        let mut b = Batch::new();
        // Adding first makes the delete succeed whether the table existed or not.
        b.add(NfListObject::Table(table()));
        b.delete(NfListObject::Table(table()));
        if self.is_empty() {
            return b;
        }
        b.add(NfListObject::Table(table()));
        for (name, kind, hook, prio) in [
            ("forward", NfChainType::Filter, NfHook::Forward, 0),
            ("prerouting", NfChainType::NAT, NfHook::Prerouting, -100),
            ("output", NfChainType::NAT, NfHook::Output, -100),
            ("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
        ] {
            b.add(NfListObject::Chain(Chain {
                family: NfFamily::IP,
                table: TABLE.into(),
                name: name.into(),
                _type: Some(kind),
                hook: Some(hook),
                prio: Some(prio),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }));
        }
        let rule = |chain: &'static str, expr: Vec<Statement<'static>>, comment: Option<String>| {
            NfListObject::Rule(Rule {
                family: NfFamily::IP,
                table: TABLE.into(),
                chain: chain.into(),
                expr: expr.into(),
                comment: comment.map(Cow::Owned),
                ..Rule::default()
            })
        };

        // forward: what may reach a container through the host, and what may not.
        b.add(rule(
            "forward",
            vec![
                oifgroup(Operator::EQ),
                ct("status", Expression::String("dnat".into())),
                counter(),
                accept(),
            ],
            Some("published ports".into()),
        ));
        b.add(rule(
            "forward",
            vec![iifgroup(), oifgroup(Operator::EQ), counter(), Statement::Drop(None)],
            Some("networks meet on the overlay only, never through the host".into()),
        ));
        b.add(rule(
            "forward",
            vec![
                oifgroup(Operator::EQ),
                ct(
                    "state",
                    Expression::List(vec![
                        Expression::String("established".into()),
                        Expression::String("related".into()),
                    ]),
                ),
                counter(),
                accept(),
            ],
            Some("replies to what containers sent out".into()),
        ));
        b.add(rule(
            "forward",
            vec![oifgroup(Operator::EQ), counter(), Statement::Drop(None)],
            Some("nothing else reaches a container through the host".into()),
        ));

        // postrouting: the host's address on what leaves for elsewhere. (The input device is
        // unknown in postrouting, so the source subnets say the packet is a container's.)
        if !self.subnets.is_empty() {
            b.add(rule(
                "postrouting",
                vec![
                    self.containers_source(),
                    oifgroup(Operator::NEQ),
                    counter(),
                    Statement::Masquerade(None),
                ],
                Some("containers going out".into()),
            ));
        }
        // A container calling a port published on this host (its own, or another container's
        // on any network here): the call goes out as the host, so that the reply comes back
        // up the host's stack, where conntrack turns it into an answer from the port.
        if let Some(host) = self.host
            && !self.subnets.is_empty()
            && !self.published.is_empty()
        {
            b.add(rule(
                "postrouting",
                vec![
                    self.containers_source(),
                    oifgroup(Operator::EQ),
                    ct("status", Expression::String("dnat".into())),
                    counter(),
                    Statement::SNAT(Some(NAT {
                        addr: Some(Expression::String(host.to_string().into())),
                        family: Some(NATFamily::IP),
                        port: None,
                        flags: None,
                    })),
                ],
                Some("containers calling a port published here".into()),
            ));
        }
        // The host's own processes calling a published port on a loopback address (127.0.0.1:8080
        // for `-p 8080:80` or `-p 127.0.0.1:8080:80`): the call keeps its loopback source up to
        // here, which the container could not answer (the datapath drops what it sends to
        // 127.0.0.0/8), so it leaves as the host. This is how Docker publishes on loopback
        // without its userland proxy (route_localnet on the bridge, masquerade from local
        // sources); our veths have route_localnet for it (`netlink::egress_path`).
        if let Some(host) = self.host
            && !self.published.is_empty()
        {
            b.add(rule(
                "postrouting",
                vec![
                    matches(payload("ip", "saddr"), loopback(), Operator::EQ),
                    oifgroup(Operator::EQ),
                    ct("status", Expression::String("dnat".into())),
                    counter(),
                    Statement::SNAT(Some(NAT {
                        addr: Some(Expression::String(host.to_string().into())),
                        family: Some(NATFamily::IP),
                        port: None,
                        flags: None,
                    })),
                ],
                Some("the host calling a port published here on loopback".into()),
            ));
        }

        // prerouting (from elsewhere, and from containers) and output (from the host's own
        // processes): published ports to their containers.
        for p in &self.published {
            for chain in ["prerouting", "output"] {
                // Only to an address of this host: a host address given with the port that is
                // not (or no longer) the host's must not catch what the host forwards to it.
                let mut expr = vec![matches(
                    Expression::Named(NamedExpression::Fib(Fib {
                        result: FibResult::Type,
                        flags: [FibFlag::Daddr].into(),
                    })),
                    Expression::String("local".into()),
                    Operator::EQ,
                )];
                if let Some(ip) = p.port.host_ip {
                    expr.push(matches(
                        payload("ip", "daddr"),
                        Expression::String(ip.to_string().into()),
                        Operator::EQ,
                    ));
                }
                // Nor to the networks' gateways, which are local too (the resolver's addresses,
                // docs/names.md): `-p 53:53/udp` must not take the containers' name service.
                if !self.subnets.is_empty() {
                    expr.push(self.containers_dest());
                }
                if chain == "prerouting" {
                    // A loopback destination never comes in from a device legitimately (the
                    // kernel drops it as a martian, but only when routing it, after this
                    // hook): translated here, a neighbour on the underlay sending to
                    // 127.0.0.1:8080 would reach a port published for the host alone (`-p
                    // 127.0.0.1:8080:80`), the hole kube-proxy's route_localnet opened
                    // (CVE-2020-8558). Loopback is the host's own processes' (`output`).
                    if p.port.host_ip.is_some_and(|ip| ip.is_loopback()) {
                        continue;
                    }
                    expr.push(matches(payload("ip", "daddr"), loopback(), Operator::NEQ));
                }
                expr.push(matches(
                    payload(p.port.proto.as_str(), "dport"),
                    Expression::Number(u32::from(p.port.host_port)),
                    Operator::EQ,
                ));
                expr.push(counter());
                expr.push(Statement::DNAT(Some(NAT {
                    addr: Some(Expression::String(p.target.to_string().into())),
                    family: Some(NATFamily::IP),
                    port: Some(Expression::Number(u32::from(p.port.container_port))),
                    flags: None,
                })));
                b.add(rule(chain, expr, Some(format!("{} of container {}", p.port, p.container))));
            }
        }
        b
    }
}

/// Replaces the table with `rules` (removes it when empty), in one `nft` transaction.
pub async fn apply(rules: &Ruleset) -> Result<(), NftablesError> {
    apply_ruleset_async(&rules.batch().to_nftables()).await
}

/// Whether the kernel's table still holds `rules` as `apply` wrote them: the same chains and
/// the same rules, told apart by their comments (each of ours has one), and nothing more; for
/// an empty ruleset, that there is no table. A periodic full pass rewrites the table only when
/// it is not, so the rules' counters keep counting between passes (`nft list table ip
/// overlay` is how an operator sees what the rules matched) while a table someone flushed, or
/// a rule someone deleted or added, is still put right.
pub async fn intact(rules: &Ruleset) -> bool {
    let listing = get_current_ruleset_raw_async(None::<&str>, ["list", "table", "ip", TABLE]).await;
    let Ok(text) = listing else {
        return rules.is_empty();
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let have = shape(json["nftables"].as_array().into_iter().flatten());
    let written = serde_json::to_value(rules.batch().to_nftables()).unwrap_or_default();
    // The batch deletes and re-adds the table; what it adds is what the table should hold.
    let want = shape(written["nftables"].as_array().into_iter().flatten().filter_map(|c| c.get("add")));
    !rules.is_empty() && have == want
}

/// The chains (by name) and rules (by chain and comment) among nft JSON objects.
fn shape<'a>(objects: impl Iterator<Item = &'a serde_json::Value>) -> Vec<(String, String)> {
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let mut out: Vec<(String, String)> = objects
        .filter_map(|o| match (o.get("chain"), o.get("rule")) {
            (Some(c), _) => Some((text(&c["name"]), String::new())),
            (_, Some(r)) => Some((text(&r["chain"]), text(&r["comment"]))),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// Removes the table. For `overlay-agent reset`: without `nft` installed there is nothing of
/// ours to remove.
pub async fn remove() -> Result<(), NftablesError> {
    match apply(&Ruleset::default()).await {
        Err(NftablesError::NftExecution { inner, .. }) if inner.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        other => other,
    }
}

/// An `nft` failure in one line, with what nft said (the error's own text leaves it out).
pub fn describe(e: &NftablesError) -> String {
    match e {
        NftablesError::NftFailed { stderr, .. } => format!("{e}: {}", stderr.trim()),
        _ => e.to_string(),
    }
}

fn table() -> Table<'static> {
    Table { family: NfFamily::IP, name: TABLE.into(), ..Table::default() }
}

fn matches(left: Expression<'static>, right: Expression<'static>, op: Operator) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn iifgroup() -> Statement<'static> {
    matches(meta(MetaKey::Iifgroup), Expression::Number(GROUP), Operator::EQ)
}

fn oifgroup(op: Operator) -> Statement<'static> {
    matches(meta(MetaKey::Oifgroup), Expression::Number(GROUP), op)
}

fn ct(key: &'static str, right: Expression<'static>) -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT { key: key.into(), family: None, dir: None })),
        right,
        Operator::IN,
    )
}

/// 127.0.0.0/8.
fn loopback() -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String("127.0.0.0".into())),
        len: 8,
    }))
}

fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    #[test]
    fn an_empty_ruleset_only_removes_the_table() {
        let json = serde_json::to_value(Ruleset::default().batch().to_nftables()).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 2, "{json}");
        assert!(cmds[0]["add"]["table"].is_object() && cmds[1]["delete"]["table"].is_object(), "{json}");
    }

    #[test]
    fn a_table_is_intact_when_its_chains_and_rules_are_the_ones_written() {
        let rules = Ruleset { subnets: ["10.0.9.0/24".parse().unwrap()].into(), ..Ruleset::default() };
        let written = serde_json::to_value(rules.batch().to_nftables()).unwrap();
        let adds: Vec<&serde_json::Value> =
            written["nftables"].as_array().unwrap().iter().filter_map(|c| c.get("add")).collect();
        let want = shape(adds.iter().copied());
        assert!(
            want.contains(&("forward".into(), "nothing else reaches a container through the host".into()))
        );
        assert!(want.contains(&("postrouting".into(), String::new())), "chains count too: {want:?}");
        // A listing has the objects without "add", counters filled in, in its own order.
        let mut listed: Vec<serde_json::Value> = adds.iter().rev().map(|o| (*o).clone()).collect();
        assert_eq!(shape(listed.iter()), want);
        // One rule gone: not intact.
        let gone = listed.iter().position(|o| o.get("rule").is_some()).unwrap();
        listed.remove(gone);
        assert_ne!(shape(listed.iter()), want);
    }

    #[test]
    fn a_published_port_is_translated_in_prerouting_and_output() {
        let rules = Ruleset {
            subnets: ["10.0.9.0/24".parse().unwrap()].into(),
            published: [Published {
                port: PortMapping {
                    proto: Proto::Udp,
                    host_ip: Some("198.18.0.1".parse().unwrap()),
                    host_port: 8080,
                    container_port: 80,
                },
                target: "10.0.9.2".parse().unwrap(),
                container: "web".into(),
            }]
            .into(),
            host: Some("198.18.0.1".parse().unwrap()),
        };
        let text = serde_json::to_string(&rules.batch().to_nftables()).unwrap();
        assert_eq!(
            text.matches(r#""dnat":{"addr":"10.0.9.2","family":"ip","port":80}"#).count(),
            2,
            "{text}"
        );
        assert!(text.contains(r#""protocol":"udp","field":"dport""#), "{text}");
        // Even with a host address given: only to an address of this host, never a gateway's.
        assert_eq!(text.matches(r#""fib""#).count(), 2, "{text}");
        assert_eq!(
            text.matches(r#"{"set":[{"prefix":{"addr":"10.0.9.0","len":24}}]},"op":"!=""#).count(),
            2,
            "{text}"
        );
        assert!(text.contains(r#""masquerade""#), "{text}");
        assert!(text.contains(r#""snat":{"addr":"198.18.0.1","family":"ip"}"#), "{text}");
        assert!(text.contains("198.18.0.1:8080:80/udp of container web"), "{text}");
        // Loopback: never translated as it comes in from a device (prerouting), translated for
        // the host's own processes (output), which then call as the host.
        let loopback = r#"{"match":{"left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"127.0.0.0","len":8}},"op":"!="}}"#;
        assert_eq!(text.matches(loopback).count(), 1, "{text}");
        let prerouting = text.find(r#""chain":"prerouting","expr""#).unwrap();
        assert!(
            text[prerouting..].find(loopback).unwrap() < text[prerouting..].find(r#""dnat""#).unwrap(),
            "{text}"
        );
        assert!(text.contains("the host calling a port published here on loopback"), "{text}");
        assert_eq!(rules.published.first().unwrap().port.proto, Proto::Udp);
    }
}
