"""The "Get a token" tab (CAPTCHA_MODE=proof_of_work): the visitor's browser solves an argon2id
challenge and receives a temporary user token.

The hashing runs in the browser (hash-wasm's argon2id, vendored under static/vendor and served
by the proxy at /pow/argon2.js); the server only hands out signed challenges and checks one
solution each (proxy/access/pow.py). The button runs the script below client-side: no Gradio
event reaches the server, the browser calls /pow/challenge and /pow/verify itself."""

from __future__ import annotations

import gradio as gr

from ui.common import UIContext, esc

SOLVE_JS = r"""
async () => {
  const progress = (text) => {
    const el = document.querySelector('#pow-progress');
    if (el) el.textContent = text;
  };
  const fail = (text) => { progress(''); return ['', text]; };
  const root = window.location.pathname.replace(/\/+$/, '');
  try {
    if (!window.hashwasm || !window.hashwasm.argon2id) {
      await new Promise((resolve, reject) => {
        const script = document.createElement('script');
        script.src = root + '/pow/argon2.js';
        script.onload = resolve;
        script.onerror = () => reject(new Error('could not load the hashing script'));
        document.head.appendChild(script);
      });
    }
    progress('Asking for a challenge…');
    const asked = await fetch(root + '/pow/challenge', {
      method: 'POST', headers: {'content-type': 'application/json'}, body: '{}',
    });
    const issued = await asked.json();
    if (!asked.ok) return fail('Could not get a challenge: ' + ((issued.error || {}).message || asked.status));
    const c = issued.challenge;
    const salt = new Uint8Array(c.s.match(/../g).map((h) => parseInt(h, 16)));
    const target = BigInt(c.d);
    const started = Date.now();
    for (let i = 1; ; i++) {
      if (Date.now() / 1000 > c.e) return fail('The challenge expired before it was solved; try again.');
      const solution = crypto.getRandomValues(new Uint32Array(4)).join('-');
      const hex = await window.hashwasm.argon2id({
        password: solution, salt: salt, parallelism: c.p, iterations: c.t,
        memorySize: c.m, hashLength: c.hl, outputType: 'hex',
      });
      if (BigInt('0x' + hex) <= target) {
        progress('Solved after ' + i + ' hashes; checking…');
        const checked = await fetch(root + '/pow/verify', {
          method: 'POST', headers: {'content-type': 'application/json'},
          body: JSON.stringify({challenge: c, signature: issued.signature, solution: solution}),
        });
        const result = await checked.json();
        if (!checked.ok) return fail('Not accepted: ' + ((result.error || {}).message || checked.status));
        progress('');
        const until = new Date(result.expires_at * 1000).toUTCString();
        return [result.token, 'Your token is ready. It works until ' + until + '. Keep it private.'];
      }
      if (i % 5 === 0) {
        const seconds = Math.round((Date.now() - started) / 1000);
        progress('Working… ' + i + ' hashes in ' + seconds + ' s (about ' + issued.iterations + ' on average)');
      }
    }
  } catch (err) {
    return fail('Something went wrong: ' + err.message);
  }
}
"""


class PowPanel:
    def __init__(self, ctx: UIContext, info: dict) -> None:
        self.ctx = ctx
        hours = float(info.get("token_hours") or 0)
        max_ips = int(info.get("max_ips") or 0)
        gr.Markdown(
            "Get your own temporary user token: your browser solves a small puzzle (it may take a minute or "
            f"two and keeps this tab busy). The token works for {esc(f'{hours:g}')} hours"
            + (f" from at most {max_ips} addresses" if max_ips else "")
            + ", with this proxy's default quotas."
        )
        self.button = gr.Button("Get a token", variant="primary", elem_id="pow-start")
        gr.HTML('<span id="pow-progress" class="muted"></span>')
        self.token = gr.Textbox(
            label="Your token", value="", interactive=False, buttons=["copy"], elem_id="pow-token"
        )
        self.status = gr.Markdown("", elem_id="pow-status")

    def wire(self) -> None:
        self.button.click(
            None, inputs=None, outputs=[self.token, self.status], js=SOLVE_JS, api_visibility="private", queue=False
        )
