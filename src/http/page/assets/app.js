// The Cloud Service API Key page (orgkey, W1). No framework, no dependencies: it talks to
// the same endpoints as every Zscaler client. Secrets (password, key, CSRF token) live only
// in this page's memory and in request bodies or headers, never in a URL or in storage.
'use strict';

(() => {
  const body = document.body;
  const PREFIX = body.dataset.prefix;
  const API = body.dataset.apiBase;
  const COLUMNS_STORAGE = 'orgkey.admin.columns';
  const COLUMNS = ['key', 'modified-by', 'modified-on'];
  const $ = (id) => document.getElementById(id);

  let session = null; // GET <prefix>/session, or null when signed out
  let key = null; // the apiKeys resource, or null when the org has no key
  let revealed = false;
  let auditBefore = null;
  let dialogAction = null;
  let busy = false; // a change is in flight: no second one, no closing its dialog
  let epoch = 0; // bumped at every sign-in and sign-out: answers from an older one are dropped
  let lastActivity = Date.now();
  let gatewayUnreachable = false;
  const REQUEST_TIMEOUT_MS = 30000;
  const channel = 'BroadcastChannel' in window ? new BroadcastChannel('orgkey-admin') : null;

  // PROTOCOL.md: the obfuscated key sent at login, for a millisecond timestamp.
  function obfuscate(apiKey, timestamp) {
    const n = String(timestamp).slice(-6);
    const r = String(parseInt(n, 10) >> 1).padStart(6, '0');
    let out = '';
    for (const digit of n) out += apiKey.charAt(Number(digit));
    for (const digit of r) out += apiKey.charAt(Number(digit) + 2);
    return out;
  }

  function show(id, text) {
    const element = $(id);
    element.textContent = text;
    element.hidden = !text;
  }

  function serverMessage(response, fallback) {
    const data = response.data;
    if (data && typeof data.message === 'string' && data.message) return data.message;
    return fallback;
  }

  // One request; a write refused for its CSRF token (the session was carried over in
  // another tab, so this tab's token is stale) is retried once with a fresh token.
  // The retry happens only if the browser is still signed in as the same admin of the same
  // org: a change confirmed for one org must never land on another.
  async function api(method, path, payload) {
    const response = await send(method, path, payload);
    if (method !== 'GET' && response.status === 403 && response.data &&
        response.data.code === 'CSRF_CHECK_FAILED' && session) {
      const before = { username: session.username, orgId: session.orgId };
      if (!await loadSession()) return { status: 401, data: null, headers: new Headers() };
      if (session.username !== before.username || session.orgId !== before.orgId) {
        return { status: 0, identityChanged: true, data: { message: '' }, headers: new Headers() };
      }
      return send(method, path, payload);
    }
    return response;
  }

  async function send(method, path, payload) {
    const headers = { Accept: 'application/json' };
    if (payload !== undefined) headers['Content-Type'] = 'application/json';
    if (method !== 'GET' && session && session.csrfToken) {
      headers['X-CSRF-Token'] = session.csrfToken;
    }
    noteActivity();
    const abort = new AbortController();
    const timer = window.setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    try {
      const response = await fetch(API + path, {
        method,
        headers,
        body: payload === undefined ? undefined : JSON.stringify(payload),
        credentials: 'same-origin',
        cache: 'no-store',
        redirect: 'error',
        signal: abort.signal,
      });
      const text = await response.text();
      let data = null;
      if (text) {
        try { data = JSON.parse(text); } catch (_) { data = null; }
      }
      return { status: response.status, data, headers: response.headers };
    } catch (_) {
      return { status: 0, data: { message: 'The gateway cannot be reached.' }, headers: new Headers() };
    } finally {
      window.clearTimeout(timer);
    }
  }

  // Activity in any tab keeps every tab's idle timer fresh, as it keeps the shared session.
  function noteActivity() {
    lastActivity = Date.now();
    if (channel) channel.postMessage('active');
  }

  // Whether the browser holds a live session (then `session` describes it). Sets
  // `gatewayUnreachable` when the question could not be asked at all.
  async function loadSession() {
    noteActivity();
    gatewayUnreachable = false;
    try {
      const response = await fetch(PREFIX + '/session', { credentials: 'same-origin', cache: 'no-store' });
      session = response.status === 200 ? await response.json() : null;
    } catch (_) {
      session = null;
      gatewayUnreachable = true;
    }
    return session !== null;
  }

  // Forgets everything the previous session showed (the key above all), so that nothing
  // of it stays in the page for the next one.
  function clearKeyPage() {
    key = null;
    revealed = false;
    $('key-rows').replaceChildren();
    $('audit-rows').replaceChildren();
    show('notice', '');
    show('page-error', '');
    show('audit-error', '');
  }

  function showSignIn(message) {
    session = null;
    epoch += 1;
    setBusy(false);
    if ($('confirm').open) $('confirm').close();
    clearKeyPage();
    $('loading').hidden = true;
    $('key-page').hidden = true;
    $('whoami').hidden = true;
    $('sign-in').hidden = false;
    show('sign-in-error', message || '');
    $('password').value = '';
    $('api-key').value = '';
    $('username').focus();
  }

  // Another tab signed out: every tab forgets the key (and anything typed into the form).
  function signedOutElsewhere(message) {
    if (session) showSignIn(message);
    else {
      $('password').value = '';
      $('api-key').value = '';
      show('sign-in-error', message);
    }
  }

  function announceSignOut() {
    if (channel) channel.postMessage('signed-out');
  }

  function sessionEnded() {
    showSignIn('Your session has ended. Sign in again.');
  }

  function identityChanged() {
    showSignIn('This browser is now signed in as another admin (in another tab). Nothing was changed here; sign in again to continue.');
  }

  async function signIn(event) {
    event.preventDefault();
    const username = $('username').value.trim();
    const password = $('password').value;
    const apiKey = $('api-key').value.trim();
    if (!username || !password || !apiKey) {
      show('sign-in-error', 'Enter your username, password and API key.');
      return;
    }
    $('sign-in-submit').disabled = true;
    const login = () => {
      const timestamp = Date.now();
      return send('POST', '/authenticatedSession', {
        apiKey: obfuscate(apiKey, timestamp),
        username,
        password,
        timestamp,
      });
    };
    let response = await login();
    let conflicting = false;
    if (response.status === 403 && response.data && response.data.code === 'CSRF_CHECK_FAILED') {
      // The browser still holds a live session (another tab's, or one this tab stopped
      // showing after idling): a state change with its cookie needs its token. Sign in
      // with it; the new session's cookie replaces the old one.
      if (await loadSession()) response = await login();
      conflicting = response.status === 403 && response.data && response.data.code === 'CSRF_CHECK_FAILED';
      session = null;
    }
    $('password').value = '';
    $('api-key').value = '';
    $('sign-in-submit').disabled = false;
    if (response.status === 200 && await loadSession()) {
      show('sign-in-error', '');
      epoch += 1;
      await showKeyPage();
      return;
    }
    if (response.status === 429) {
      const wait = response.headers.get('Retry-After') || 'a few';
      show('sign-in-error', `Too many failed sign-ins. Try again in ${wait} seconds.`);
    } else if (conflicting) {
      show('sign-in-error', 'The browser sent conflicting session cookies for this site. Clear its cookies and sign in again.');
    } else if (response.status === 403) {
      show('sign-in-error', serverMessage(response, 'This admin may not use the API.'));
    } else if (response.status === 0 || response.status >= 500) {
      show('sign-in-error', `The gateway could not complete the sign-in (${response.status ? 'HTTP ' + response.status : 'no answer'}). Try again.`);
    } else {
      // As generic as the endpoint: no hint which of the three was wrong.
      show('sign-in-error', 'Sign-in failed. Check the username, password and API key.');
    }
  }

  async function signOut() {
    const response = await api('DELETE', '/authenticatedSession');
    if (response.identityChanged) return identityChanged();
    if (response.status === 200 || response.status === 401) {
      showSignIn('You are signed out.');
      announceSignOut();
    } else {
      show('page-error', serverMessage(response, `Sign-out failed (HTTP ${response.status}); try again.`));
    }
  }

  async function showKeyPage(notice) {
    $('loading').hidden = true;
    $('sign-in').hidden = true;
    $('key-page').hidden = false;
    $('whoami').hidden = false;
    $('whoami-name').textContent = `${session.username} (${session.orgId})`;
    $('base-url').textContent = session.baseUrl || (window.location.origin + API);
    show('page-error', '');
    if (session.canManageKeys) {
      $('key-section').hidden = false;
      show('notice', notice || '');
      await loadKey();
    } else {
      key = null;
      revealed = false;
      $('key-rows').replaceChildren();
      $('key-section').hidden = true;
      show('notice', `You are signed in as ${session.username} without the key-admin scope: ` +
        'the page is read-only. Viewing and managing the API key needs key-admin.');
    }
    await loadAudit(true);
  }

  async function loadKey() {
    const asked = epoch;
    const response = await api('GET', '/apiKeys');
    if (asked !== epoch) return; // signed out or in again meanwhile
    if (response.status === 401) return sessionEnded();
    if (response.status !== 200 || !Array.isArray(response.data)) {
      show('page-error', serverMessage(response, 'The API key could not be loaded.'));
      return;
    }
    key = response.data.length ? response.data[0] : null;
    renderKey();
  }

  function cell(row, column, content) {
    const td = document.createElement('td');
    if (column) td.dataset.column = column;
    if (typeof content === 'string') td.textContent = content;
    else if (content) td.append(...content);
    row.append(td);
    return td;
  }

  function button(id, label, onClick, className) {
    const element = document.createElement('button');
    element.type = 'button';
    element.id = id;
    element.textContent = label;
    element.className = className || 'small';
    element.addEventListener('click', onClick);
    return element;
  }

  function renderKey() {
    const rows = $('key-rows');
    rows.replaceChildren();
    $('add-key').disabled = key !== null;
    $('add-hint').hidden = key === null;
    if (key === null) {
      const row = document.createElement('tr');
      const td = cell(row, null, 'No API key. No API request or sign-in for the organization succeeds until you add one.');
      td.colSpan = 4;
      td.id = 'no-key';
      rows.append(row);
      return;
    }
    const row = document.createElement('tr');
    row.id = 'key-row';
    const value = document.createElement('span');
    value.id = 'key-value';
    value.className = 'key-value';
    value.textContent = revealed ? key.keyValue : '•'.repeat(key.keyValue.length);
    const reveal = button('reveal-key', revealed ? 'Hide' : 'Show', () => {
      revealed = !revealed;
      renderKey();
    });
    reveal.setAttribute('aria-pressed', String(revealed));
    const copied = document.createElement('span');
    copied.id = 'copy-status';
    copied.className = 'copied';
    copied.setAttribute('role', 'status');
    const copy = button('copy-key', 'Copy', () => copyKey(copied));
    cell(row, 'key', [value, reveal, copy, copied]).className = 'key-cell';
    cell(row, 'modified-by', key.lastModifiedBy ? key.lastModifiedBy.name : '—').id = 'modified-by';
    const on = cell(row, 'modified-on', key.lastModifiedTime ? new Date(key.lastModifiedTime * 1000).toLocaleString() : '—');
    on.id = 'modified-on';
    if (key.lastModifiedTime) on.title = new Date(key.lastModifiedTime * 1000).toISOString();
    const actions = cell(row, null, [
      button('edit-key', 'Edit', () => openDialog('edit')),
      button('regenerate-key', 'Regenerate', () => openDialog('regenerate')),
      button('delete-key', 'Delete', () => openDialog('delete')),
    ]);
    actions.className = 'actions';
    rows.append(row);
  }

  async function copyKey(status) {
    if (!key) return;
    try {
      await navigator.clipboard.writeText(key.keyValue);
      status.textContent = 'Copied';
      return;
    } catch (_) {
      // No clipboard API here (an insecure context, or permission refused): fall back.
    }
    const area = document.createElement('textarea');
    area.value = key.keyValue;
    area.setAttribute('readonly', '');
    area.className = 'offscreen';
    document.body.append(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand('copy'); } catch (_) { ok = false; }
    area.remove();
    status.textContent = ok ? 'Copied' : 'Copy failed: reveal the key and copy it by hand.';
  }

  const DIALOGS = {
    edit: {
      title: 'Edit the API key',
      text: 'Set the key to a value of your choice, for example the key another organization uses.',
      ok: 'Save',
      notice: 'The API key was changed. The old key no longer works.',
    },
    regenerate: {
      title: 'Regenerate the API key?',
      text: 'A new random key replaces the current one.',
      ok: 'Regenerate',
      notice: 'The API key was regenerated. The old key no longer works.',
    },
    delete: {
      title: 'Delete the API key?',
      text: 'No API request or sign-in for the organization succeeds until a key is added.',
      ok: 'Delete',
      notice: 'The API key was deleted. Add a new key to use the API again.',
    },
  };

  function keyPattern() {
    return new RegExp(`^[A-Za-z0-9]{${session.keyLength}}$`);
  }

  function openDialog(action) {
    const spec = DIALOGS[action];
    dialogAction = action;
    $('confirm-title').textContent = spec.title;
    $('confirm-text').textContent = spec.text;
    $('confirm-ok').textContent = spec.ok;
    $('edit-fields').hidden = action !== 'edit';
    $('new-key').value = '';
    $('new-key-hint').textContent = `Exactly ${session.keyLength} letters (A-Z, a-z) or digits (0-9).`;
    show('confirm-error', '');
    $('confirm').showModal();
    if (action === 'edit') $('new-key').focus();
  }

  function closeDialog() {
    if (busy) return;
    dialogAction = null;
    $('new-key').value = '';
    $('confirm').close();
  }

  function setBusy(value) {
    busy = value;
    for (const id of ['confirm-ok', 'confirm-cancel']) $(id).disabled = value;
    $('add-key').disabled = value || key !== null;
  }

  async function confirmDialog(event) {
    event.preventDefault();
    const action = dialogAction;
    if (!action || busy) return;
    if (action === 'edit' && !keyPattern().test($('new-key').value)) {
      show('confirm-error', `The key must be exactly ${session.keyLength} letters (A-Z, a-z) or digits (0-9).`);
      return;
    }
    const asked = epoch;
    let response;
    setBusy(true);
    try {
      if (action === 'edit') {
        response = await api('PUT', '/apiKeys/1', { keyValue: $('new-key').value });
      } else if (action === 'regenerate') {
        response = await api('POST', '/apiKeys/1/regenerate');
      } else {
        response = await api('DELETE', '/apiKeys/1');
      }
    } finally {
      if (asked === epoch) setBusy(false);
    }
    if (asked !== epoch) return; // signed out or in again meanwhile: not this page's answer
    if (response.identityChanged) return identityChanged();
    if (response.status === 401) {
      closeDialog();
      return sessionEnded();
    }
    if (response.status !== 200 && response.status !== 204) {
      // The server's own words (a bad value, a concurrent change, a missing scope).
      show('confirm-error', serverMessage(response, `The change was refused (HTTP ${response.status}).`));
      return;
    }
    closeDialog();
    await changed(DIALOGS[action].notice, response.status === 200 ? response.data : null, action);
  }

  async function addKey() {
    if (busy) return;
    const asked = epoch;
    let response;
    setBusy(true);
    try {
      response = await api('POST', '/apiKeys');
    } finally {
      if (asked === epoch) setBusy(false);
    }
    if (asked !== epoch) return;
    if (response.identityChanged) return identityChanged();
    if (response.status === 401) return sessionEnded();
    if (response.status !== 200) {
      show('page-error', serverMessage(response, `The key could not be added (HTTP ${response.status}).`));
      return;
    }
    await changed('A new API key was added. Use it in code developed for your organization.', response.data, 'add');
  }

  // After a change the server carried this browser's session over to the new generation
  // (a new cookie, so a new CSRF token); every other session of the org ended. If this
  // browser's session did not continue (a later change, a sign-out racing the change), the
  // change still happened: say so, and show the key it set, once, because signing in needs
  // the org's current key.
  async function changed(notice, resource, action) {
    if (await loadSession()) {
      await showKeyPage(notice);
      return;
    }
    if (gatewayUnreachable) {
      show('page-error', 'The change was made, but the gateway could not be reached afterwards. Reload the page.');
      return;
    }
    const newKey = resource && typeof resource.keyValue === 'string' ? resource.keyValue : '';
    showSignIn(action === 'delete'
      ? 'The API key was deleted, and this browser\'s session ended with it: no sign-in succeeds until a key is added.'
      : `The change was made, but this browser's session did not continue with it. The key it set is ${newKey}; if signing in with it fails, another change came after it.`);
  }

  async function loadAudit(first) {
    if (first) {
      auditBefore = null;
      $('audit-rows').replaceChildren();
    }
    const query = auditBefore === null ? '?limit=20' : `?limit=20&before=${auditBefore}`;
    const asked = epoch;
    const response = await api('GET', '/auditLog' + query);
    if (asked !== epoch) return;
    if (response.status === 401) return sessionEnded();
    if (response.status !== 200 || !Array.isArray(response.data)) {
      show('audit-error', serverMessage(response, 'The audit log could not be loaded.'));
      $('audit-more').hidden = true;
      return;
    }
    show('audit-error', '');
    const rows = $('audit-rows');
    for (const record of response.data) {
      const row = document.createElement('tr');
      cell(row, null, new Date(record.time * 1000).toLocaleString());
      cell(row, null, record.actor);
      cell(row, null, record.action);
      cell(row, null, String(record.generation));
      rows.append(row);
      auditBefore = record.seq;
    }
    $('audit-empty').hidden = rows.children.length > 0;
    $('audit-more').hidden = response.data.length < 20;
  }

  function applyColumns(visible) {
    const table = $('key-table');
    for (const column of COLUMNS) {
      table.classList.toggle(`hide-${column}`, !visible[column]);
      const box = document.querySelector(`#columns-menu input[data-column="${column}"]`);
      box.checked = visible[column];
    }
  }

  function storedColumns() {
    const visible = Object.fromEntries(COLUMNS.map((c) => [c, true]));
    try {
      const saved = JSON.parse(window.localStorage.getItem(COLUMNS_STORAGE) || '{}');
      for (const column of COLUMNS) {
        if (typeof saved[column] === 'boolean') visible[column] = saved[column];
      }
    } catch (_) {
      // Unreadable or unavailable storage: all columns.
    }
    return visible;
  }

  function columnToggled(event) {
    const visible = storedColumns();
    visible[event.target.dataset.column] = event.target.checked;
    try { window.localStorage.setItem(COLUMNS_STORAGE, JSON.stringify(visible)); } catch (_) { /* not remembered */ }
    applyColumns(visible);
  }

  function toggleColumnsMenu() {
    const menu = $('columns-menu');
    menu.hidden = !menu.hidden;
    $('columns-button').setAttribute('aria-expanded', String(!menu.hidden));
  }

  async function start() {
    $('sign-in-form').addEventListener('submit', signIn);
    $('sign-out').addEventListener('click', signOut);
    $('add-key').addEventListener('click', addKey);
    $('confirm-form').addEventListener('submit', confirmDialog);
    $('confirm-cancel').addEventListener('click', closeDialog);
    $('confirm').addEventListener('close', () => { dialogAction = null; $('new-key').value = ''; });
    $('columns-button').addEventListener('click', toggleColumnsMenu);
    $('audit-more').addEventListener('click', () => loadAudit(false));
    for (const box of document.querySelectorAll('#columns-menu input')) {
      box.addEventListener('change', columnToggled);
    }
    // Escape must not close the dialog while its change is on its way.
    $('confirm').addEventListener('cancel', (event) => { if (busy) event.preventDefault(); });
    if (channel) {
      channel.onmessage = (message) => {
        if (message.data === 'active') lastActivity = Date.now();
        else if (message.data === 'signed-out') signedOutElsewhere('You signed out in another tab.');
      };
    }
    // The server ends a session unused for its idle timeout; so does the page, so that a key
    // left on screen in an unattended tab goes away.
    window.setInterval(async () => {
      if (session && !busy && Date.now() - lastActivity >= session.idleTimeoutMs) {
        // The server has ended it too, or does now; every tab learns of it.
        await send('DELETE', '/authenticatedSession');
        showSignIn('Your session ended after a period without activity. Sign in again.');
        announceSignOut();
      }
    }, 5000);
    applyColumns(storedColumns());
    if (await loadSession()) await showKeyPage();
    else showSignIn();
    body.dataset.ready = 'true';
  }

  start();
})();
