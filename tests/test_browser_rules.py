"""The rules page in Debian's headless Chromium: edit, see the problem next to
the field, dry run, save and roll back. Screenshots go where
``test_browser.py`` keeps its own."""

# Fixtures come from tests/web_helpers.py and test_browser.py by import.
# ruff: noqa: F811, F401
from __future__ import annotations

from playwright.sync_api import expect

from tests.helpers import event
from tests.test_browser import browser, shots, sign_in
from tests.web_helpers import technician, web, web_gateway


def test_technician_edits_checks_dry_runs_saves_and_rolls_back(
    browser, web_gateway, technician, mqtt, topics, shots
):
    display = mqtt(topics.alerts)
    mqtt().publish(topics.events("call-1"), event("call-1"))
    display.wait_for_json(device="call-1", state="open")

    base = f"http://127.0.0.1:{web_gateway.web_port}"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    sign_in(page, base, "/rules")
    rule = page.locator("section.rule[data-name=patient-call]")
    expect(rule).to_have_count(1)
    expect(page.locator("#version")).to_have_text("version 1")

    # A typo in a level: the problem appears under the rule, naming the field.
    rule.locator("button.edit").click()
    editor = rule.locator("textarea.yaml")
    text = editor.input_value()
    editor.fill(text.replace("- after: 10m", "- aftr: 10m"))
    expect(rule.locator(".edited")).to_be_visible()
    page.click("#check")
    problem = rule.locator(".problems li")
    expect(problem).to_have_count(1)
    expect(problem).to_have_attribute("data-field", "levels[1].aftr")
    expect(problem).to_contain_text("did you mean 'after'?")
    expect(rule).to_have_class("rule invalid")
    page.screenshot(path=shots / "rules-problem.png")

    # Fixed, and charge nurses paged after 1 s: the dry run shows the change.
    editor.fill(text.replace("- after: 10m", "- after: 1s"))
    page.fill("#hours", "1")
    page.click("#dry-run")
    expect(page.locator("#dry-summary")).to_contain_text("1 changed")
    changed = page.locator("#dry-table tr.changed")
    expect(changed).to_have_count(1)
    expect(changed.locator("td.side").nth(1)).to_contain_text("L2: charge_nurse")
    expect(rule.locator(".problems li")).to_have_count(0)
    page.screenshot(path=shots / "rules-dry-run.png")

    page.fill("#comment", "charge nurse sooner")
    page.click("#save")
    expect(page.locator("#message")).to_have_text("Saved as version 2; it runs now.")
    expect(page.locator("#version")).to_have_text("version 2")
    expect(page.locator("#audit tbody tr").first).to_contain_text("charge nurse sooner")

    page.locator("#versions tr[data-version='1'] button.rollback").click()
    expect(page.locator("#message")).to_have_text(
        "Rolled back to version 1: now version 3."
    )
    expect(page.locator("#version")).to_have_text("version 3")
    rule = page.locator("section.rule[data-name=patient-call]")
    rule.locator("button.edit").click()
    expect(rule.locator("textarea.yaml")).to_have_value(text)
    page.screenshot(path=shots / "rules-rolled-back.png", full_page=True)
    assert technician.ok("GET", "/api/rules")["version"]["number"] == 3
