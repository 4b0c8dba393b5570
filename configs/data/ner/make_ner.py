#!/usr/bin/env python3
"""Generate the NER example set (train.conll / dev.conll), CoNLL-2003 style.

Sentences were written for the tandem project (people are fictional; places
and organisations are used only in neutral, made-up statements). Entities are
marked inline as [PER ...], [LOC ...], [ORG ...] and converted to IOB2 tags.
Tokenisation: whitespace, with , ; : ? ! ( ) " and a possessive 's split off,
and the sentence-final period as its own token (inner "Dr." keeps its dot).
Run: python3 make_ner.py   (writes next to this script)
"""
import os
import random
import re

SENTENCES = r"""
[PER Anna Kowalski] flew from [LOC Warsaw] to [LOC Lisbon] on Tuesday.
The [ORG World Health Organization] opened a new office in [LOC Nairobi].
[PER David Okafor] scored twice as [ORG Manchester City] beat [ORG Everton] 3-1.
[PER Hiroshi Tanaka] has worked at [ORG Toyota] for twenty years.
Heavy snow closed several roads in northern [LOC Scotland] yesterday.
[PER Maria Fernanda Lopez] was elected mayor of [LOC Valencia] last week.
The [ORG United Nations] will hold its next climate meeting in [LOC Bonn].
Dr. [PER Samuel Reyes] leads the cancer research team at [ORG Stanford University].
[PER Li Wei] and [PER Chen Jing] opened a noodle shop in [LOC Vancouver].
[ORG Samsung Electronics] reported higher profits for the third quarter.
The river [LOC Danube] flows through [LOC Vienna] and [LOC Budapest].
[PER Fatima Al-Sayed] won the gold medal in the women's marathon.
Shares in [ORG Deutsche Bank] fell sharply in [LOC Frankfurt] on Monday.
[PER Tom Becker] moved to [LOC San Francisco] to join [ORG Google].
The festival attracts visitors from all over [LOC South America].
[PER Priya Sharma] studied medicine at the [ORG University of Delhi].
[ORG Real Madrid] signed the young striker from [ORG Ajax].
Police in [LOC Melbourne] are searching for a missing hiker.
[PER Olga Petrova] conducted the [ORG Berlin Philharmonic] on Saturday night.
The [ORG European Central Bank] kept interest rates unchanged.
[PER James O'Connor] grew up in a small village near [LOC Cork].
Tourists crowded the beaches of [LOC Bali] during the holiday.
[PER Kim Min-jun] joined [ORG Hyundai Motor] as an engineer in 2015.
The [ORG Red Cross] sent food and blankets to flooded areas of [LOC Bangladesh].
[PER Elena Rossi] published her first novel with [ORG Penguin Books].
The match between [ORG Liverpool] and [ORG Arsenal] ended in a draw.
[PER Ahmed Hassan] drove from [LOC Cairo] to [LOC Alexandria] in three hours.
[ORG Microsoft] announced a new office in [LOC Dublin].
The [LOC Amazon] rainforest covers much of northern [LOC Brazil].
[PER Sophie Martin] teaches history at a school in [LOC Lyon].
[PER Carlos Mendes] was named coach of [ORG Benfica].
The [ORG International Olympic Committee] met in [LOC Lausanne] last month.
[PER Yuki Sato] climbed [LOC Mount Fuji] with her father.
The [ORG New York Times] interviewed several residents of [LOC Brooklyn].
[PER Grace Mwangi] founded a small bakery in [LOC Mombasa].
Flights to [LOC Reykjavik] were cancelled because of the volcanic ash.
[PER Lucas Schmidt] works as a nurse at [ORG Charité Hospital] in [LOC Berlin].
[ORG Nokia] was once the largest phone maker in the world.
[PER Isabella Garcia] and her brother visited [LOC Machu Picchu] in [LOC Peru].
The [ORG Bank of England] warned that inflation could rise again.
[PER Noah Williams] hit a home run for the [ORG Chicago Cubs].
A new bridge will connect [LOC Copenhagen] and [LOC Malmo].
[PER Amara Nwosu] is the chief executive of [ORG Lagos Energy Group].
[ORG Oxfam] raised money to build wells in rural [LOC Ethiopia].
[PER Mateo Silva] cycled across [LOC Portugal] in two weeks.
The [ORG Metropolitan Museum of Art] is in [LOC New York City].
[PER Ingrid Larsen] skied for [LOC Norway] at the winter games.
[ORG Airbus] built a new factory near [LOC Toulouse].
[PER Raj Patel] runs a popular restaurant on [LOC Brick Lane] in [LOC London].
Storms battered the coast of [LOC Florida] over the weekend.
[PER Leila Haddad] studied architecture at the [ORG American University of Beirut].
[ORG FC Barcelona] celebrated the title in the streets of [LOC Barcelona].
[PER Omar Farouk] is a pilot for [ORG Emirates].
Farmers in [LOC Punjab] expect a good wheat harvest this year.
[PER Chloe Dubois] sang at the opening of the [ORG Paris Opera] season.
The [ORG National Aeronautics and Space Administration] launched a new satellite.
[PER Pedro Alvarez] was born in [LOC Buenos Aires] and now lives in [LOC Madrid].
[ORG Amnesty International] published a report on prison conditions.
[PER Anja Novak] coaches the national volleyball team of [LOC Slovenia].
A small earthquake shook [LOC Wellington] early on Friday.
[PER William Chen] joined [ORG Goldman Sachs] after finishing his degree.
[PER Zainab Bello] won a scholarship to [ORG Harvard University].
The [LOC Sahara] is the largest hot desert on Earth.
[ORG Volkswagen] will recall thousands of cars in [LOC Germany].
[PER Marco Bianchi] owns a vineyard in [LOC Tuscany].
[PER Hannah Fischer] reported from [LOC Kyiv] for [ORG Reuters].
[ORG Sony] released a new camera in [LOC Tokyo] on Wednesday.
[PER Aiden Murphy] plays the fiddle in a band from [LOC Galway].
Thousands marched through [LOC Santiago] to demand better pensions.
[PER Natalia Ivanova] was appointed director of the [ORG Bolshoi Theatre].
[ORG Greenpeace] activists climbed the oil platform in the [LOC North Sea].
[PER Ethan Brooks] teaches physics at [ORG Ridgeway High School].
[PER Mei Ling] sells handmade pottery at a market in [LOC Taipei].
The [ORG World Bank] approved a loan for roads in [LOC Kenya].
[PER Jonas Berg] sailed alone from [LOC Oslo] to [LOC Iceland].
[ORG Tesla] opened a factory outside [LOC Shanghai].
[PER Aisha Khan] spoke at a conference organised by [ORG Save the Children].
The [LOC Nile] is one of the longest rivers in the world.
[PER Daniel Cohen] is a lawyer with a firm in [LOC Tel Aviv].
[ORG Juventus] sold tickets for the match within an hour.
[PER Rosa Martinez] was hired by the [ORG City of Barcelona] to plan new parks.
A heatwave hit [LOC Athens] for the third week in a row.
[PER Kwame Mensah] became the first student from his village to attend [ORG University of Ghana].
[ORG Apple] hired a new design chief from [ORG Nike].
[PER Sarah Thompson] wrote a guidebook about walking in the [LOC Lake District].
The [ORG Louvre] welcomed almost nine million visitors last year.
[PER Viktor Horvat] plays basketball for [ORG Cibona Zagreb].
Traffic was heavy on the road between [LOC Seoul] and [LOC Incheon].
[PER Emily Clarke] is a spokesperson for [ORG British Airways].
[ORG Siemens] signed a deal to build trains for [LOC Egypt].
[PER Ana Costa] grew coffee on a farm near [LOC Medellin].
The [ORG Smithsonian Institution] is based in [LOC Washington].
[PER Benjamin Lee] won the chess tournament in [LOC Singapore].
Wildfires burned large areas of forest in [LOC California].
[PER Sven Johansson] leads the research group at [ORG Karolinska Institute].
[ORG Heineken] bought a brewery in [LOC Vietnam].
[PER Aylin Demir] sells carpets in the [LOC Grand Bazaar] in [LOC Istanbul].
The [ORG African Union] held an emergency summit in [LOC Addis Ababa].
[PER Rachel Green] works for a small charity in [LOC Manchester].
[PER Thabo Nkosi] grew up in [LOC Soweto] and studied in [LOC Cape Town].
[ORG Lufthansa] cancelled dozens of flights because of a strike.
[PER Giulia Romano] opened an ice cream shop near the [LOC Colosseum].
The [ORG Federal Reserve] raised interest rates by a quarter point.
[PER Arjun Mehta] joined [ORG Infosys] as a software developer.
Rain is expected across [LOC Ireland] for the rest of the week.
[PER Claire Bennett] won the [ORG Royal Society] prize for her work on bacteria.
[ORG Boeing] delivered fewer planes than expected last year.
[PER Diego Herrera] swam across the [LOC Strait of Gibraltar].
[PER Julia Weber] is a violinist with the [ORG Vienna Symphony Orchestra].
The [LOC Alps] stretch across eight countries in [LOC Europe].
[ORG Tottenham Hotspur] announced a new stadium sponsor.
[PER Nguyen Van An] runs a cooking school in [LOC Hanoi].
[PER Laura Jensen] was elected to the city council of [LOC Aarhus].
[ORG IKEA] opened its first store in [LOC Chile].
[PER Mohammed Rahman] drives a taxi in [LOC Dhaka].
Floods forced thousands to leave their homes along the [LOC Yangtze River].
[PER Katarzyna Nowak] coaches young swimmers at a club in [LOC Krakow].
[ORG Unilever] will close two factories in [LOC France].
[PER Oliver Hughes] was interviewed by the [ORG BBC] about the election.
[PER Sipho Dlamini] guides tourists through [LOC Kruger National Park].
The [ORG Chinese Academy of Sciences] announced a new telescope project.
[PER Camila Torres] studies marine biology in [LOC Galapagos].
[ORG Shell] reported record profits in [LOC London] on Thursday.
[PER Henrik Nielsen] is the new captain of [ORG Brondby].
The [LOC Rocky Mountains] run from [LOC Canada] to [LOC New Mexico].
[PER Lina Saleh] volunteers at a refugee centre run by [ORG Caritas].
[ORG Toyota] and [ORG Panasonic] agreed to develop batteries together.
[PER Patrick Dunne] sells fish at a market in [LOC Dublin].
[PER Yasmin Aziz] is a judge at the [ORG International Court of Justice].
A new metro line will link [LOC Riyadh] airport with the city centre.
[PER Robert Kim] manages a hotel in [LOC Honolulu].
[ORG Ferrari] unveiled a new car at a show in [LOC Geneva].
[PER Eva Horak] translates novels for a publisher in [LOC Prague].
[PER Tariq Jamil] teaches mathematics at [ORG Lahore Grammar School].
The [LOC Baltic Sea] froze near the coast of [LOC Finland].
[ORG Spotify] is headquartered in [LOC Stockholm].
[PER Anita Desai] cooked dinner for the guests of the [ORG Taj Hotel].
[PER Frank Müller] repaired clocks in [LOC Munich] for forty years.
[ORG Bayern Munich] won the league for the eleventh time in a row.
[PER Chiara Conti] designs shoes for a company in [LOC Milan].
Protesters gathered outside the [ORG European Parliament] in [LOC Strasbourg].
[PER Ryan O'Neill] coaches rugby at [ORG Trinity College].
[PER Svetlana Kuznetsova] walked her dog along the [LOC Neva] every morning.
[ORG Netflix] filmed a new series in [LOC Morocco].
[PER Juan Carlos Ortega] owns three bakeries in [LOC Mexico City].
The [LOC Great Barrier Reef] lies off the coast of [LOC Queensland].
[PER Nadia Benali] is a reporter for [ORG Al Jazeera].
[ORG Nestlé] moved its regional office to [LOC Singapore].
[PER Felix Wagner] won a cycling race through the [LOC Black Forest].
[PER Joy Adeyemi] sings in a church choir in [LOC Ibadan].
The [ORG Australian Bureau of Meteorology] issued a storm warning.
[PER Andrés Vega] sold his startup to [ORG Amazon].
[PER Helen Carter] was named head teacher of [ORG St Mary's Primary School].
Ferries between [LOC Dover] and [LOC Calais] were delayed by high winds.
[ORG Uber] faces new rules in several cities in [LOC Spain].
[PER Alexei Volkov] translated poetry at the [ORG Moscow State University].
[PER Lucy Wang] opened a tea house in [LOC Chengdu].
[ORG Greenpeace] and [ORG WWF] criticised the new mining plan.
[PER Marcus Johnson] ran the hundred metres in under ten seconds.
Snow fell on the streets of [LOC Jerusalem] for the first time in years.
[PER Ines Ferreira] works as a guide at the [ORG Gulbenkian Museum].
[ORG Adidas] signed a sponsorship deal with [ORG Arsenal].
[PER Paul Schneider] drove a lorry from [LOC Hamburg] to [LOC Rotterdam].
[PER Sun Li] won first prize at a piano competition in [LOC Warsaw].
The [ORG World Trade Organization] ruled against the new tariffs.
[PER Omar Diallo] plays football for [ORG Olympique de Marseille].
[PER Rebecca Stone] writes a weekly column for [ORG The Guardian].
Hikers often get lost in the mountains of [LOC Patagonia].
[ORG Intel] will build a chip factory in [LOC Ohio].
[PER Kenji Watanabe] is a chef at a restaurant in [LOC Kyoto].
[PER Fiona MacLeod] breeds sheep on the island of [LOC Skye].
The [ORG Scottish Parliament] debated the new housing law.
[PER Abdul Karim] sells spices at a stall in [LOC Marrakesh].
[ORG Barclays] closed fifty branches across [LOC Britain].
[PER Eleni Papadopoulou] teaches ancient Greek in [LOC Thessaloniki].
[PER Victor Hugo Santos] is the mayor of [LOC Porto Alegre].
Tourists queued for hours to see the [LOC Sistine Chapel].
[PER Linda Park] works at the [ORG Korea Development Institute].
[ORG Volvo] will stop making diesel engines.
[PER George Adams] fished on [LOC Lake Michigan] every summer.
[PER Astrid Lindqvist] studies glaciers for the [ORG Norwegian Polar Institute].
[ORG Coca-Cola] opened a bottling plant near [LOC Lagos].
[PER Tomás Novák] was born in [LOC Prague] in 1962.
[PER Alice Moreau] manages a bookshop on the [LOC Left Bank].
The [ORG University of Toronto] received a large gift for medical research.
[PER Bilal Ahmed] rode a motorbike from [LOC Karachi] to [LOC Islamabad].
[ORG Philips] sold its lighting business to investors.
[PER Naomi Fletcher] won the junior title at [LOC Wimbledon].
The [LOC Mekong] passes through six countries in [LOC Asia].
[PER Jorge Ramirez] is a firefighter in [LOC Los Angeles].
[ORG Ryanair] added new routes from [LOC Bristol].
[PER Mia Hoffmann] studies law at [ORG Heidelberg University].
[PER Kofi Boateng] grows cocoa on a farm in [LOC Ghana].
[ORG Vodafone] improved its network in rural [LOC Wales].
[PER Irina Popescu] sang with the [ORG Romanian National Opera].
Icebergs drifted south towards [LOC Newfoundland].
[PER Charlie Evans] fixed bicycles in a garage in [LOC Cambridge].
The talks in [LOC Geneva] ended without an agreement.
[PER Beatriz Oliveira] joined [ORG Petrobras] as a geologist.
[PER Ali Reza] opened a carpet shop in [LOC Tehran].
[ORG Porsche] moved some production to [LOC Slovakia].
[PER Nora Lindgren] is the youngest member of the [ORG Swedish Academy].
Heavy traffic slowed the journey from [LOC Boston] to [LOC New Haven].
[PER Samir Aoun] plays the oud in a band from [LOC Beirut].
The [ORG Food and Agriculture Organization] warned of poor harvests.
[PER Lisa Nguyen] is a doctor at [ORG Mount Sinai Hospital].
[ORG Rolex] is based in [LOC Geneva].
[PER Hugo Lambert] rides for [ORG Team Visma] in the mountains of [LOC France].
Monsoon rains flooded parts of [LOC Mumbai] on Sunday.
[PER Clara Schmitt] left [ORG Siemens] to start her own company.
[PER Ivan Petrov] swam in the cold waters of [LOC Lake Baikal].
[ORG Toyota] recalled cars sold in [LOC Australia].
[PER Aaliyah Brooks] writes songs for a band from [LOC Atlanta].
[PER Gabriel Rocha] is studying engineering at the [ORG University of São Paulo].
The [LOC Pacific Ocean] is the largest ocean on the planet.
[ORG Qantas] flies daily between [LOC Sydney] and [LOC Los Angeles].
[PER Elif Yilmaz] works as an architect in [LOC Ankara].
[PER Martin Kovac] gave a lecture at the [ORG Slovak Academy of Sciences].
[ORG Manchester United] will play a friendly match in [LOC Tokyo].
[PER Zoe Richards] teaches swimming at the [ORG Leeds Aquatics Centre].
Farmers in [LOC Iowa] are worried about the dry summer.
[PER Amir Tehrani] translated the poems of [PER Hafez] into English.
The [ORG Tate Modern] opened a new exhibition of Brazilian art.
[PER Nicolás Duarte] was born in [LOC Montevideo].
[ORG Huawei] unveiled a folding phone in [LOC Shenzhen].
[PER Julia Santos] paddled a canoe down the [LOC Rio Negro].
[PER Sean Kelly] runs a pub in the town of [LOC Killarney].
[ORG Nintendo] released a new game for children.
[PER Hana Yoshida] practises judo at a club in [LOC Osaka].
The [LOC Himalayas] contain the highest mountains on Earth.
[PER Leo Fischer] joined the [ORG Swiss Federal Railways] as a driver.
[ORG Walmart] raised wages for its workers in [LOC Texas].
[PER Mariana Castro] reported on the election for [ORG El País].
[PER Ibrahim Toure] runs a clinic in [LOC Bamako].
A strong wind damaged roofs in [LOC Rotterdam] and [LOC The Hague].
[PER Peter Hansen] sells herring from a boat in [LOC Bergen].
[ORG Harvard University] and [ORG MIT] are both in [LOC Cambridge].
[PER Valentina Greco] is a lawyer with an office in [LOC Naples].
[PER Chidi Okeke] plays drums in a jazz club in [LOC Abuja].
[ORG Air France] resumed flights to [LOC Montreal].
[PER Yara Haddad] swam across the [LOC Dead Sea] for charity.
[PER Mark Robinson] works for the [ORG Environment Agency] in [LOC York].
[ORG Samsung] opened a research lab in [LOC Cambridge].
[PER Agnes Kowalczyk] owns a flower shop in [LOC Gdansk].
The [LOC Thames] flows through the centre of [LOC London].
[PER Rahul Verma] is a cricket commentator for [ORG Star Sports].
[ORG Carrefour] closed stores in several cities in [LOC Italy].
[PER Jenny Liu] studied economics at [ORG Peking University].
[PER Rafael Moreno] built boats in a workshop near [LOC Cadiz].
The [ORG Salvation Army] served hot meals in [LOC Detroit].
[PER Karin Svensson] hikes the [LOC Kungsleden] trail every summer.
[ORG Tata Steel] signed a contract with a company in [LOC Wales].
[PER Ahmed Yusuf] is the imam of a mosque in [LOC Birmingham].
[PER Elisa Bruno] paints landscapes of the [LOC Dolomites].
[ORG Chelsea] confirmed that their goalkeeper was injured.
[PER Kevin O'Brien] worked for [ORG Guinness] at the brewery in [LOC Dublin].
[PER Sofia Andersson] teaches yoga in [LOC Gothenburg].
Wildlife officials counted more elephants in [LOC Botswana] this year.
[PER Hamid Karimi] studies Persian literature at [ORG University of Tehran].
[ORG Panasonic] moved its European headquarters to [LOC Amsterdam].
[PER Erin Walsh] is a nurse at [ORG Boston Children's Hospital].
[PER Tomasz Zielinski] fixes organs in churches across [LOC Poland].
The [LOC Atacama Desert] is one of the driest places on Earth.
[PER Nadine Klein] writes for [ORG Der Spiegel].
[ORG Ajax] won the Dutch cup after extra time.
[PER Paolo Ricci] sold his pizzeria in [LOC Chicago] after thirty years.
[PER Mina Park] is a researcher at [ORG KAIST] in [LOC Daejeon].
[ORG Doctors Without Borders] opened a hospital in [LOC Yemen].
[PER Arthur Blake] walked the length of [LOC Hadrian's Wall].
[PER Lucia Fernandez] manages a hotel in [LOC Seville].
[ORG Google] and [ORG Samsung] announced a new partnership.
[PER Tunde Bakare] is a taxi driver in [LOC Lagos].
Ice closed the harbour in [LOC Helsinki] for several days.
[PER Greta Hofer] makes cheese on a farm in [LOC Tyrol].
[ORG BMW] will build electric cars in [LOC Hungary].
[PER Jamal Wright] plays point guard for the [ORG Boston Celtics].
[PER Selin Kaya] won a national poetry prize in [LOC Turkey].
[PER Adam Novak] cycled from [LOC Vienna] to [LOC Bratislava].
[ORG UNICEF] delivered vaccines to remote villages in [LOC Nepal].
[PER Lena Hartmann] is the conductor of the [ORG Leipzig Gewandhaus Orchestra].
Smoke from the fires drifted over [LOC Sydney].
[PER Diego Castillo] runs a surf school on the coast of [LOC Costa Rica].
[PER Aoife Byrne] is studying medicine at [ORG University College Dublin].
[ORG Starbucks] opened its largest cafe in [LOC Milan].
[PER Wang Fang] teaches Mandarin at a school in [LOC Toronto].
[PER Pierre Lefebvre] makes wine in [LOC Burgundy].
The [ORG Indian Space Research Organisation] landed a probe on the moon.
[PER Sara Lindberg] photographs wildlife in [LOC Lapland].
[PER Musa Kamara] is a fisherman in [LOC Freetown].
[ORG Lego] is based in the small Danish town of [LOC Billund].
[PER Charlotte Price] was promoted to partner at [ORG Deloitte].
[PER Hassan Ali] guides climbers up [LOC Mount Kilimanjaro].
The [ORG Vatican Museums] extended their opening hours.
[PER Isak Holm] races sled dogs in northern [LOC Sweden].
[PER Bianca Lazar] studies violin at the [ORG Juilliard School] in [LOC New York].
[ORG Maersk] ships containers from [LOC Rotterdam] to [LOC Singapore].
The weather was cold and windy for most of the day.
Prices at the local market rose again this week.
[PER Olivia Grant] and [PER Nathan Grant] run a sheep farm near [LOC Adelaide].
The [ORG Royal Botanic Gardens] in [LOC Kew] planted a rare tree from [LOC Madagascar].
"""

SPAN = re.compile(r"\[(PER|LOC|ORG) ([^\]]+)\]")
LEAD = "(\""
TRAIL = ",;:?!)\""


def split_plain(text):
    toks = []
    for piece in text.split():
        lead = []
        while piece and piece[0] in LEAD:
            lead.append(piece[0])
            piece = piece[1:]
        trail = []
        while piece and piece[-1] in TRAIL:
            trail.insert(0, piece[-1])
            piece = piece[:-1]
        toks.extend(lead)
        if piece.endswith("'s") and len(piece) > 2:
            toks.extend([piece[:-2], "'s"])
        elif piece == "'s":
            toks.append("'s")
        elif piece:
            toks.append(piece)
        toks.extend(trail)
    return toks


def convert(line):
    line = line.strip()
    final = None
    if line[-1] in ".?!":
        final, line = line[-1], line[:-1]
    out = []
    pos = 0
    for m in SPAN.finditer(line):
        out += [(t, "O") for t in split_plain(line[pos:m.start()])]
        words = m.group(2).split()
        out += [(w, ("B-" if i == 0 else "I-") + m.group(1)) for i, w in enumerate(words)]
        pos = m.end()
    out += [(t, "O") for t in split_plain(line[pos:])]
    if final:
        out.append((final, "O"))
    assert "[" not in " ".join(t for t, _ in out), line
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    sents = [s for s in SENTENCES.strip().splitlines() if s.strip()]
    assert len(sents) == len(set(sents)), "duplicate sentence"
    rng = random.Random(20240613)
    rng.shuffle(sents)
    n_dev = 50
    for name, group in [("dev.conll", sents[:n_dev]), ("train.conll", sents[n_dev:])]:
        with open(os.path.join(here, name), "w", encoding="utf-8", newline="\n") as f:
            f.write("-DOCSTART- O\n\n")
            f.write("\n\n".join("\n".join(f"{t} {l}" for t, l in convert(s)) for s in group))
            f.write("\n")
        print(name, len(group))


if __name__ == "__main__":
    main()
