(() => {
  const failures = [];
  const width = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > width) failures.push('page scrolls sideways: ' + document.documentElement.scrollWidth + ' > ' + width);
  for (const c of document.querySelectorAll('button, select, input')) {
    if (c.closest('[hidden]')) continue;
    const r = c.getBoundingClientRect();
    if (r.left < 0 || r.right > width || r.width === 0) failures.push('control outside the viewport: ' + c.outerHTML.slice(0, 100) + ' ' + JSON.stringify(r));
  }
  // Nothing spills out of its section (a table wider than its column overlaps the next one).
  for (const section of document.querySelectorAll('section')) {
    const box = section.getBoundingClientRect();
    for (const e of section.querySelectorAll('table, form, ol, p, div')) {
      const r = e.getBoundingClientRect();
      if (r.width && (r.right > box.right + 1 || r.left < box.left - 1))
        failures.push(`${e.tagName}${e.id ? '#' + e.id : ''} spills out of section #${section.id}: ${Math.round(r.left)}–${Math.round(r.right)} outside ${Math.round(box.left)}–${Math.round(box.right)}`);
    }
  }
  return failures;
})()
