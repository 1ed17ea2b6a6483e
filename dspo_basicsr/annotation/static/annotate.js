// The annotation studio's page script: choices by mouse or keys, answers posted as JSON, then the next item.
// Every text this script shows is set with textContent, never as HTML.
(function () {
  'use strict';
  var main = document.querySelector('main.study');
  if (!main) { return; }
  var kind = document.body.dataset.kind;
  var annotator = main.dataset.annotator;
  var loadedAt = performance.now();
  var status = document.getElementById('status');
  var busy = false;

  function say(text) { if (status) { status.textContent = text; } }

  function post(url, body) {
    if (busy) { return; }
    busy = true;
    fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
                credentials: 'same-origin'})
      .then(function (r) { return r.json().then(function (data) { return {status: r.status, data: data}; }); })
      .then(function (reply) {
        if (reply.status === 200 || reply.status === 409) { window.location.reload(); return; }
        busy = false;
        say(reply.data.error || 'The server refused the answer.');
      })
      .catch(function () { busy = false; say('The server cannot be reached; your answer was not saved. Retry.'); });
  }

  function send(answer) {
    post('api/answer', {annotator: annotator, item: main.dataset.item, round: parseInt(main.dataset.round, 10),
                        answer: answer, seconds: (performance.now() - loadedAt) / 1000});
  }

  function undo() { post('api/undo', {annotator: annotator}); }

  var undoButton = document.getElementById('undo');
  if (undoButton) { undoButton.addEventListener('click', undo); }

  if (kind === 'instances') {
    var n = parseInt(main.dataset.candidates, 10);
    var best = null, worst = null;
    var submit = document.getElementById('submit');

    function show() {
      for (var c = 0; c < n; c++) {
        var tile = document.getElementById('candidate-' + c);
        tile.classList.toggle('is-best', c === best);
        tile.classList.toggle('is-worst', c === worst);
        tile.querySelector('.mark').textContent = c === best ? 'best' : (c === worst ? 'worst' : '');
      }
      submit.disabled = best === null || worst === null;
      say(best === null ? 'Pick the best candidate.' : (worst === null ? 'Now pick the worst candidate.' :
          'Best ' + (best + 1) + ', worst ' + (worst + 1) + ': Enter to submit.'));
    }

    function pick(c, which) {
      if (which === 'best' || (which === undefined && best === null)) {
        best = best === c ? null : c;
        if (worst === best) { worst = null; }
      } else if (which === 'worst' || (which === undefined && worst === null)) {
        worst = worst === c ? null : c;
        if (best === worst) { best = null; }
      } else if (c === best) { best = null; } else if (c === worst) { worst = null; }
      show();
    }

    function hallucinated() {
      var ticked = [];
      main.querySelectorAll('input.hallucinated').forEach(function (box) {
        if (box.checked) { ticked.push(parseInt(box.dataset.index, 10)); }
      });
      return ticked;
    }

    function toggleWhole() {
      main.querySelectorAll('.tiles img').forEach(function (img) {
        var other = img.dataset.full;
        img.dataset.full = img.getAttribute('src');
        img.setAttribute('src', other);
      });
      main.classList.toggle('whole');
    }

    main.querySelectorAll('figure.candidate').forEach(function (tile) {
      var c = parseInt(tile.dataset.index, 10);
      tile.querySelector('img').addEventListener('click', function () { pick(c); });
      tile.querySelector('button.best').addEventListener('click', function () { pick(c, 'best'); });
      tile.querySelector('button.worst').addEventListener('click', function () { pick(c, 'worst'); });
    });
    submit.addEventListener('click', function () {
      if (best !== null && worst !== null) { send({best: best, worst: worst, hallucinated: hallucinated()}); }
    });
    document.getElementById('nopref').addEventListener('click', function () {
      send({no_preference: true, hallucinated: hallucinated()});
    });
    document.getElementById('toggle').addEventListener('click', toggleWhole);

    document.addEventListener('keydown', function (event) {
      if (event.target.tagName === 'INPUT' && event.target.type === 'text') { return; }
      var digit = /^Digit([0-9])$/.exec(event.code);
      if (digit) {
        var c = parseInt(digit[1], 10) - 1;
        if (c === -1) { document.getElementById('nopref').click(); } else if (c < n) {
          if (event.shiftKey) {
            var box = main.querySelector('input.hallucinated[data-index="' + c + '"]');
            if (box) { box.checked = !box.checked; }
          } else { pick(c); }
        }
        event.preventDefault();
      } else if (event.key === 'Enter') { submit.click(); event.preventDefault(); }
      else if (event.key === 'f' || event.key === 'F') { toggleWhole(); }
      else if (event.key === 'u' || event.key === 'U') { undo(); }
      else if (event.key === 'Escape') { best = null; worst = null; show(); }
    });
    show();
  } else if (main.classList.contains('pairwise')) {
    var choose = function (side) { send({choice: document.getElementById(side).dataset.choice}); };
    document.getElementById('left').addEventListener('click', function () { choose('left'); });
    document.getElementById('right').addEventListener('click', function () { choose('right'); });
    document.addEventListener('keydown', function (event) {
      if (event.key === 'ArrowLeft' || event.key === 'a' || event.key === 'A') { choose('left'); }
      else if (event.key === 'ArrowRight' || event.key === 'l' || event.key === 'L') { choose('right'); }
      else if (event.key === 'u' || event.key === 'U') { undo(); }
    });
  } else {
    document.addEventListener('keydown', function (event) {
      if (event.key === 'u' || event.key === 'U') { undo(); }
    });
  }
}());
