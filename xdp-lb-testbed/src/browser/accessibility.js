(() => {
  const failures = [];
  for (const c of document.querySelectorAll('input, select, button, textarea')) {
    const labelled = (c.labels && [...c.labels].some((l) => l.textContent.trim()))
      || (c.getAttribute('aria-label') || '').trim()
      || (c.tagName === 'BUTTON' && c.textContent.trim());
    if (!labelled) failures.push('no label: ' + c.outerHTML.slice(0, 120));
  }
  const rgba = (s) => { const m = s.match(/rgba?\(([^)]+)\)/); if (!m) return null; const p = m[1].split(',').map(Number); return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 }; };
  const lum = (c) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); }; return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); };
  const background = (e) => { for (; e; e = e.parentElement) { const c = rgba(getComputedStyle(e).backgroundColor); if (c && c.a > 0) return c; } return { r: 255, g: 255, b: 255, a: 1 }; };
  let checked = 0;
  for (const e of document.body.querySelectorAll('*')) {
    const own = [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !e.getClientRects().length) continue;
    const style = getComputedStyle(e);
    if (style.visibility === 'hidden' || e.closest('.visually-hidden')) continue;
    const fg = rgba(style.color), bg = background(e);
    const [a, b] = [lum(fg), lum(bg)];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    checked += 1;
    if (ratio < 4.5) failures.push(`contrast ${ratio.toFixed(2)} < 4.5: ${style.color} on ${getComputedStyle(e).backgroundColor} (${e.tagName} "${e.textContent.trim().slice(0, 40)}")`);
  }
  if (checked < 20) failures.push('only ' + checked + ' text elements checked');
  return failures;
})()
