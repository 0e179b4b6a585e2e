"""Which rules and groups change when the table or the switch does.

Pure: no os-ken, no sockets. The Balancer keeps what it believes the switch holds (rules
by key, groups by id) and answers each event with the changes that take the switch from
that to what the table wants: a node that turns unhealthy changes only its groups'
buckets, so established connections (in the tracker) keep their node and new ones go
to the others at once. Nothing here runs per connection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from controller import flows
from controller.flows import Change, DataPath, Group, GroupMod, Rule
from testbed.cloud.lb_table import Table

log = logging.getLogger("svclab.lb")


@dataclass(frozen=True)
class SyncReport:
    """What a (re)connected switch held and what it took to make it right."""

    rules_kept: int
    groups_kept: int
    rules_added: int
    rules_removed: int
    groups_added: int
    groups_modified: int
    groups_removed: int

    def __str__(self) -> str:
        return (f"kept {self.rules_kept} rules and {self.groups_kept} groups as they were; "
                f"rules +{self.rules_added} -{self.rules_removed}, groups +{self.groups_added} "
                f"~{self.groups_modified} -{self.groups_removed}")


class Balancer:
    def __init__(self, dp: DataPath) -> None:
        self.dp = dp
        self.table: Table | None = None
        self.rules: dict[tuple, Rule] = {}  # what the switch holds, as far as we know
        self.groups: dict[int, Group] = {}
        self.last_sync: SyncReport | None = None

    def set_table(self, new: Table) -> list[Change]:
        """Changes that take the switch from what it holds to what `new` wants."""
        self.table = new
        return self._converge()

    def switch_connected(self, rules: list[Rule], groups: list[Group]) -> list[Change]:
        """After (re)connecting: start from what the switch holds (our rules and all groups), then converge.

        A restarted app re-learns the groups it left (their buckets are the nodes the
        switch balances over) and changes only what the table no longer wants, so the
        switch forwards throughout and established connections never notice.
        """
        self.rules = {r.key: r for r in rules if flows.parse_cookie(r.cookie) is not None}
        self.groups = {g.group_id: g for g in groups}
        if self.table is None:
            return []
        before_rules, before_groups = dict(self.rules), dict(self.groups)
        changes = self._converge()
        for rule in (c for c in changes if isinstance(c, Rule) and c.key in before_rules):
            log.info("replacing %s (the switch had %s)", rule, before_rules[rule.key])
        self.last_sync = SyncReport(
            rules_kept=sum(1 for k, r in before_rules.items() if self.rules.get(k) == r),
            groups_kept=sum(1 for i, g in before_groups.items() if self.groups.get(i) == g),
            rules_added=sum(1 for c in changes if isinstance(c, Rule)),
            rules_removed=sum(1 for c in changes if isinstance(c, flows.Delete)),
            groups_added=sum(1 for c in changes if isinstance(c, GroupMod) and c.command == "add"),
            groups_modified=sum(1 for c in changes if isinstance(c, GroupMod) and c.command == "modify"),
            groups_removed=sum(1 for c in changes if isinstance(c, GroupMod) and c.command == "delete"),
        )
        log.info("switch connected: %s", self.last_sync)
        return changes

    def _converge(self) -> list[Change]:
        """Groups first (a rule may only point at a group that exists), then rules, then groups no rule needs."""
        want_rules, want_groups = flows.pipeline(self.table or Table(), self.dp)
        changes: list[Change] = []
        for gid, group in want_groups.items():
            have = self.groups.get(gid)
            if have != group:
                changes.append(GroupMod("add" if have is None else "modify", group))
        changes += self._rule_changes(want_rules)
        changes += [GroupMod("delete", g) for gid, g in sorted(self.groups.items()) if gid not in want_groups]
        self.rules, self.groups = want_rules, want_groups
        return changes

    def _rule_changes(self, want: dict[tuple, Rule]) -> list[Change]:
        gone_ips = self._external_ips(self.rules) - self._external_ips(want)
        changes: list[Change] = [flows.delete_lb(ip) for ip in sorted(gone_ips)]
        for key, rule in self.rules.items():
            if key not in want and self._ip_of(rule) not in gone_ips:
                changes.append(flows.delete_rule(rule))
        # an ADD of a rule that exists replaces it in place (OpenFlow): no gap for its packets
        changes += [rule for key, rule in want.items() if self.rules.get(key) != rule]
        return changes

    @staticmethod
    def _ip_of(rule: Rule) -> str | None:
        parsed = flows.parse_cookie(rule.cookie)
        return parsed[1] if parsed is not None and parsed[0] != flows.BASE else None

    @classmethod
    def _external_ips(cls, rules: dict[tuple, Rule]) -> set[str]:
        return {ip for ip in (cls._ip_of(r) for r in rules.values()) if ip is not None}

    def backends(self) -> dict[int, list[tuple[str, int]]]:
        """Per group: the (node, nodePort) its buckets send new connections to."""
        return {gid: flows.backends_of(g) for gid, g in sorted(self.groups.items())}
